"""Errors the CLI reports as one line with exit code 2 (bad input), instead of a traceback."""


class UsageError(ValueError):
    """Bad user input: unknown name, bad option value, missing or corrupt data file."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class MethodContractError(TypeError):
    """A method broke the harness's contract after training (its ``fit`` returned no EnsembleModel, an
    unknown combine rule, another number of members than it declares): the run fails with its record saying
    why; the CLI prints that one line (exit code 1), as for a diverged run."""
