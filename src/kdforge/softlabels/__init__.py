"""The soft-label cache: the teacher's top-k log-probabilities on disk (format, quantisation, reader)."""
