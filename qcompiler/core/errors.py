"""Errors the user can fix. Their messages say what was wrong and what to do.

Every error qcompiler raises on purpose is a :class:`QCompilerError`; the CLI turns exactly those into
a message and exit code 2 (anything else is a bug of ours and keeps its traceback). The subclasses
that also derive from a builtin (``ValueError``, ``TypeError``, ``FileNotFoundError``) are what a
Python user would expect to catch for that kind of mistake.
"""


class QCompilerError(RuntimeError):
    """A problem with the user's model, data, options or files (not a bug of qcompiler)."""


class ConfigError(QCompilerError, ValueError):
    """A recipe, option or argument with a value qcompiler does not take."""


class ConfigTypeError(QCompilerError, TypeError):
    """A recipe, option or argument of the wrong type."""


class InputFileError(QCompilerError, FileNotFoundError):
    """A model, text or folder the user named is missing or unreadable."""


class CalibrationError(QCompilerError):
    """Calibration cannot run or cannot finish on the given model and batches."""


class StatsError(QCompilerError):
    """Calibration statistics are missing, corrupted, or do not match the model."""


class ArtifactError(QCompilerError):
    """An artifact folder is missing, corrupted, tampered with, or made for another model."""


class ExportError(QCompilerError, ValueError):
    """A model or recipe that the asked-for export format cannot hold."""


class OutputPathError(QCompilerError, ValueError):
    """An output path that can not be written (a folder where a file goes, an occupied folder, read-only)."""
