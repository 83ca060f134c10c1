"""Atomic file writes: a file that exists is complete.

Every cache and store of the package (checkpoints, result rows, saved searches) writes through
:func:`atomic_write`: the bytes go to a temporary file in the same folder, are flushed to disk,
and the file is renamed into place with ``os.replace`` (atomic on POSIX and Windows). A process
killed while writing leaves at most a hidden ``.tmp`` file that no reader looks at.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(fh)`` on a temporary binary file, then move it to ``path`` atomically.

    Parameters
    ----------
    path
        The final file; its folder is created if needed. An existing file is replaced only once
        the new one is complete.
    write
        Writes the content to the open binary file handle it is given.

    Returns
    -------
    Path
        ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target
