"""Writing a file, on local disk or in an object store (any fsspec url), so that it appears whole or not at all.

Here (fsspec only, no torch) so that the library's checkpoints and the stages' files (the stages'
io module re-exports these) share one implementation, and the library depends on no stage code.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP = ".tmp"  # the suffix of a file still being written


@contextlib.contextmanager
def atomic_path(path: str):
    """A local file name to write `path` through; `path` exists only once the block completes.

    Locally: path.tmp, renamed into place. In an object store, which has no rename (a move is a
    copy and a delete): a local temporary file of the same name, then one put of the whole object.
    An exception leaves neither a half file nor a temporary one.
    """
    fs, p = fsspec.core.url_to_fs(str(path))
    fs.makedirs(fs._parent(p), exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        with tempfile.TemporaryDirectory(prefix="softcurate-") as staging:
            local = os.path.join(staging, os.path.basename(p) + TMP)
            yield local
            fs.put_file(local, p)
        return
    try:
        yield p + TMP
        os.replace(p + TMP, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p + TMP)
        raise


@contextlib.contextmanager
def atomic_open(path: str):
    """A binary file object to write `path` through (atomic_path's file)."""
    with atomic_path(path) as local, open(local, "wb") as f:
        yield f


def atomic_write(path: str, data: str | bytes) -> None:
    """Bytes, or a str as UTF-8, to `path` through atomic_path."""
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
