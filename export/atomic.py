"""Writing without half-written results: every output goes to a temporary sibling and is renamed into place only
when complete (a failed or interrupted command leaves nothing behind). Results get the permissions a plain
mkdir/open would give them (the umask), not mkdtemp's 0700 / mkstemp's 0600."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pocketllm.export.errors import PocketllmError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def relax_permissions(path: Path) -> None:
    """Give `path` (a file, or a directory and everything below it) the umask's default permissions."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for p in path.rglob("*"):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; move it to `out` only if the block finishes without error."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise PocketllmError(f"{out}: already exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    relax_permissions(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) then rename onto `path`: a failed write never leaves a half-written file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise PocketllmError(f"{path}: cannot write here ({e.strerror})") from None
    os.close(fd)
    try:
        write(tmp)
        relax_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk, a name that became a directory meanwhile, ...
            raise PocketllmError(f"{path}: writing failed ({e.strerror or e})") from None
        raise


def write_json(path: Path, data: Any) -> None:
    """Indented JSON, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
