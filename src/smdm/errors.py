"""Exceptions that the command line reports as a one-line error instead of a traceback."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""
