"""Reading the user's text files with errors that name the file and what is wrong with it."""

from __future__ import annotations

from pathlib import Path

from qcompiler.core.errors import InputFileError


def read_text(path: str | Path, what: str = "text file") -> str:
    """The UTF-8 text of ``path``; an :class:`InputFileError` naming it if it is missing, a folder, or
    not UTF-8 text (a binary file)."""
    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"{what} {path} is a folder: give a UTF-8 text file")
    if not path.is_file():
        raise InputFileError(f"{what} {path} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): "
                             "give a plain text file") from exc


def occupied(path: str | Path) -> bool:
    """True if ``path`` exists and is not an empty folder: an output we would not write into."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))
