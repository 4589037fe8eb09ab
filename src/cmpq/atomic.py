"""Files that are either the old version or the complete new one: write a temporary file beside the target,
flush it to disk, then rename it into place (a failure midway leaves no partial file under the target name)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def ordinary_mode(directory: bool = False) -> int:
    """The mode `open()`/`mkdir()` would give under the current umask: mkstemp/mkdtemp give 0600/0700, too
    private for a model or a report other users (or a server's account) should read."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(handle)` on a temporary file in `path`'s directory and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, ordinary_mode())  # mkstemp makes 0600; these are ordinary files
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
