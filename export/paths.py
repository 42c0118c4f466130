"""Input paths, checked with messages that name what the path actually is ("is a directory, not a text file"
rather than "text file not found"), and UTF-8 text read with a one-line error instead of a UnicodeDecodeError.

Pure Python; export/checkpoint.py, the bundle reader, parity and the CLI all read their inputs through these.
"""

from __future__ import annotations

from pathlib import Path

from pocketllm.export.errors import PocketllmError


def what_is(path: Path) -> str:
    """'a directory', 'a file', 'missing' or 'not a file or directory' (a socket, a broken link, ...)."""
    path = Path(path)
    if path.is_dir():
        return "a directory"
    if path.is_file():
        return "a file"
    return "missing" if not path.exists() and not path.is_symlink() else "not a file or directory"


def _require(path: Path, what: str, kind: str) -> Path:
    path = Path(path)
    found = what_is(path)
    if found == "missing":
        raise PocketllmError(f"{path}: {what} not found")
    if found != kind:
        raise PocketllmError(f"{path} is {found}, not a {what}")
    return path


def require_dir(path: Path, what: str) -> Path:
    """`path` must be a directory; `what` names it in the message ("checkpoint directory")."""
    return _require(path, what, "a directory")


def require_file(path: Path, what: str) -> Path:
    """`path` must be a regular file; `what` names it in the message ("text file", "prompts file")."""
    return _require(path, what, "a file")


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 contents of the file `path` (one-line errors: missing, a directory, not UTF-8, unreadable)."""
    path = require_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PocketllmError(f"{path}: cannot read the {what} ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PocketllmError(f"{path}: the {what} is not UTF-8 text ({e.reason} at byte {e.start}); convert it, "
                             "e.g. iconv -f latin1 -t utf-8") from None
