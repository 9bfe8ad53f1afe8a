"""Atomic file writes and hashing: nothing the tool writes is ever half-written under its final name."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CompressError


def _os_error(exc: OSError, path: Path) -> CompressError:
    if exc.errno == errno.ENOSPC:
        return CompressError(f"disk full while writing {path}", hint="free some space and rerun with --resume", kind="runtime")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CompressError(f"cannot write {path}: permission denied", hint="choose another --out directory")
    return CompressError(f"cannot write {path}: {exc.strerror or exc}", kind="runtime")


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create a directory (and parents) or raise CompressError saying why it cannot be."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CompressError(f"{p} exists and is not a directory", hint="choose another --out directory") from None
    except OSError as exc:
        raise _os_error(exc, p) from None
    if not os.access(p, os.W_OK):
        raise CompressError(f"cannot write to {p}: permission denied", hint="choose another --out directory")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    final = Path(path)
    ensure_dir(final.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the final file the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _os_error(exc, final) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a temporary file, so a kill never leaves a truncated checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
