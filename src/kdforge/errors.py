"""The error type for bad input: the CLI prints its message (what, where, how to fix) without a traceback."""


class UserError(ValueError):
    """Bad input from the user: a config, a data file, a model path."""
