"""The user's files: reading text with errors that name the file, checking output paths before the work,
and writing folders and files atomically (complete or absent, never half)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from qcompiler.core.errors import InputFileError, OutputPathError


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


def check_output(path: str | Path, what: str, *, folder: bool, replaceable=None) -> Path:
    """Check, before any long work, that ``path`` can be written as a ``folder`` (else a file).

    A file output may replace an existing file, never a folder. A folder output must be absent or empty,
    or an existing folder that ``replaceable(path)`` accepts (an older output of the same kind). The nearest
    existing ancestor must be a writable folder. Raises :class:`OutputPathError` naming ``what``."""
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise OutputPathError(f"{what} {path} is a file: give a folder")
        if occupied(path) and not (replaceable is not None and replaceable(path)):
            raise OutputPathError(f"{what} {path} exists and is not an empty folder: give a new or empty folder")
    elif path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder: give a file name")
    ancestor = path if folder and path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: the folder {ancestor} is not writable")
    return path


@contextlib.contextmanager
def atomic_folder(out: str | Path):
    """Build a folder at a temporary sibling of ``out`` (yielded), then put it in place of ``out``.

    A run that fails or is killed leaves ``out`` as it was (absent, or the old folder) and at worst a hidden
    ``.NAME.*`` sibling; an old ``out`` is moved aside and removed only once the new one is complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary folder
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.old"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder: complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
