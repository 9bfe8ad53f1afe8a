"""Atomic file writes and hashing: nothing the tool writes is ever half-written under its final name."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CompressError


def write_error(exc: OSError, path: Path) -> CompressError:
    """The CompressError for an OSError met creating or writing `path`: disk full, permission denied, a file on the path."""
    if exc.errno == errno.ENOSPC:
        return CompressError(f"disk full while writing {path}", hint="free some space and rerun with --resume", kind="runtime")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CompressError(f"cannot write {path}: permission denied", hint="choose another --out directory")
    if exc.errno == errno.ENOTDIR:
        return CompressError(f"cannot write {path}: a folder on its path is a file", hint="choose another --out directory")
    return CompressError(f"cannot write {path}: {exc.strerror or exc}", kind="runtime")


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create a directory (and parents) or raise CompressError saying why it cannot be."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CompressError(f"{p} exists and is not a directory", hint="choose another --out directory") from None
    except OSError as exc:
        raise write_error(exc, p) from None
    if not p.is_dir():
        raise CompressError(f"{p} exists and is not a directory", hint="choose another --out directory")
    if not os.access(p, os.W_OK):
        raise CompressError(f"cannot write to {p}: permission denied", hint="choose another --out directory")
    return p


def is_writer() -> bool:
    """False in every process of a distributed (torchrun) job but rank 0: only rank 0 writes files."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    In a distributed job's other ranks the content goes to a private scratch file that is thrown away,
    so every stage can run unchanged on every rank while only rank 0 touches the run directory."""
    final = Path(path)
    if not is_writer():
        with tempfile.TemporaryDirectory(prefix="compressor-rank") as scratch:
            yield Path(scratch) / final.name
        return
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
        raise write_error(exc, final) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    # backslashreplace: a non-UTF-8 file name (os.fsdecode's surrogates) quoted in a report is written as \udcXX
    write_bytes(path, text.encode("utf-8", "backslashreplace"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a temporary file, so a kill never leaves a truncated checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        # through a Python file object: a full disk then raises OSError(ENOSPC), which atomic_path reports,
        # where torch's own file writer raises an opaque RuntimeError
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


def safe_extract(tar_path: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract a tarball into dest, refusing any member that would land outside it; returns the files written.

    Refused: absolute names, '..' components, links whose target leaves dest, device files and FIFOs.
    Python's tarfile 'data' filter (3.12, backported to 3.8.17+/3.11.4+) is applied as well where present."""
    import tarfile

    tar_path, root = Path(tar_path), Path(dest)
    root = ensure_dir(root).resolve()

    def refuse(name: str, why: str) -> CompressError:
        return CompressError(f"{tar_path}: member {name!r} {why}; refusing to extract", hint="the archive may be malicious; rebuild it with relative paths only")

    try:
        tar = tarfile.open(tar_path, "r:*")
    except FileNotFoundError:
        raise CompressError(f"{tar_path} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CompressError(f"{tar_path} is not a readable tar archive: {exc}") from None
    written = []
    try:
        with tar:
            members = tar.getmembers()
            for m in members:
                name = m.name
                parts = Path(name.replace("\\", "/")).parts
                if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
                    raise refuse(name, "has an absolute path")
                if ".." in parts:
                    raise refuse(name, "has a '..' component")
                target = (root / name).resolve()
                if not target.is_relative_to(root):
                    raise refuse(name, "would be written outside the destination")
                if m.isdev() or m.isfifo() or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                    raise refuse(name, "is a device file or other special file")
                if m.issym() or m.islnk():
                    link = m.linkname
                    if os.path.isabs(link) or link.startswith(("/", "\\")):
                        raise refuse(name, f"links to the absolute path {link!r}")
                    base = target.parent if m.issym() else root
                    if not (base / link).resolve().is_relative_to(root):
                        raise refuse(name, f"links outside the destination ({link!r})")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            try:
                tar.extractall(root, members=members, **kwargs)
            except getattr(tarfile, "FilterError", tarfile.TarError) as exc:  # the stdlib filter caught what our checks did not
                raise CompressError(f"{tar_path}: {exc}; refusing to extract") from None
            written = [root / m.name for m in members if m.isfile()]
    except (tarfile.TarError, EOFError) as exc:
        raise CompressError(f"{tar_path} is a damaged tar archive: {exc}") from None
    except OSError as exc:
        raise write_error(exc, root) from None
    return written


def read_regular_file(path: str | os.PathLike, what: str, max_bytes: int, *, hint: str | None = None) -> bytes:
    """The bytes of a small file the user named (a profile, a config, a manifest, a report), or a CompressError saying why not.

    Anything but a regular file is refused before a byte is read: a FIFO would block forever, /dev/zero would fill
    the memory. The file is opened non-blocking (a FIFO swapped in after the check cannot block either) and at most
    max_bytes + 1 bytes are read, so a file that grows while it is read is refused too. `what` names the file in
    messages ("target profile"); hint is added to every message."""
    p = Path(path)
    name = f"{what} {p}" if what else str(p)

    def refuse(why: str) -> CompressError:
        return CompressError(f"{name} {why}", hint=hint)

    def kind(mode: int) -> str | None:
        if stat.S_ISREG(mode):
            return None
        if stat.S_ISDIR(mode):
            return "is a folder, not a file"
        special = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "a special file"
        return f"is not a regular file ({special})"

    try:
        why = kind(os.stat(p).st_mode)
        if why:
            raise refuse(why)
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise refuse("does not exist") from None
    except PermissionError:
        raise refuse("cannot be read: permission denied") from None
    except OSError as exc:  # a name too long, a loop of links, a file on its path, ...
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    too_large = refuse(f"is larger than {_size_text(max_bytes)}; refusing to read it")
    try:
        st = os.fstat(fd)
        why = kind(st.st_mode)  # what was opened, whatever the name pointed at when it was checked
        if why:
            raise refuse(why)
        if st.st_size > max_bytes:
            raise too_large
        chunks, left = [], max_bytes + 1
        while left > 0:
            block = os.read(fd, min(left, 1 << 20))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise too_large
    return data


def _size_text(n: int) -> str:
    for unit, shift in (("GB", 30), ("MB", 20), ("kB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
