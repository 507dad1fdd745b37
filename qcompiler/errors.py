"""Errors the user can fix. Their messages say what was wrong and what to do."""


class QCompilerError(RuntimeError):
    """A problem with the user's model, data, options or files (not a bug of qcompiler)."""


class CalibrationError(QCompilerError):
    """Calibration cannot run or cannot finish on the given model and batches."""


class StatsError(QCompilerError):
    """Calibration statistics are missing, corrupted, or do not match the model."""
