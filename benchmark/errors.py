"""Errors the CLI reports as one line with exit code 2 (bad input), instead of a traceback."""


class UsageError(ValueError):
    """Bad user input: unknown name, bad option value, missing or corrupt data file."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""
