"""kdforge: distil a large chat model into a small, fast one, and ship it."""

__version__ = "0.1.0"
