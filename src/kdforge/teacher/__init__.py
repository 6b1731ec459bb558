"""The teacher's side: batched generation of answers (and, later, the soft-label cache)."""
