"""The soft-label cache: the teacher's top-k log-probabilities on disk (format, quantisation, reader).

The folder layout, declared once (the label stage writes it, the reader and distill read it):
``manifest.json`` (written last: a cache without it is unfinished) and ``shard-NNNNN.safetensors``.
"""

MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"
