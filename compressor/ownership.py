"""Which folders the tool may write in, and who is writing there now.

The rule: the tool writes only inside a folder it created or that carries its own marker (a run's manifest.json, a
deploy bundle's manifest.json), replaces only its own artifacts, and deletes only names it makes itself. A lock file
per run folder (`run.lock`, held with flock while a command writes there) turns a second writer away."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from ._io import is_writer
from .errors import CompressError

MANIFEST = "manifest.json"
LOCK = "run.lock"
LOG = "compress.log"
# what a claim leaves before the manifest exists: a folder holding only these is still one of ours
CLAIM_FILES = frozenset({LOCK, LOG})
# the sub-folders a run writes into; the stale-temporary sweep looks there and nowhere else
RUN_SUBDIRS = ("cache", "checkpoints", "search", "auto")
# _io.atomic_path's temporaries: '.NAME.' + mkstemp's random letters + '.tmp'
_TMP = re.compile(r"\.[^/]+\.[A-Za-z0-9_]{6,}\.tmp")
# quantize's scratch folders (tempfile.TemporaryDirectory(prefix='.quantize-') in the run folder)
_SCRATCH = re.compile(r"\.quantize-[A-Za-z0-9_]{6,}")
_LOCK_ENV = "COMPRESSOR_RUN_LOCK"  # inherited by the processes a lock holder starts (torchrun workers)


def _not_ours(path: Path, what: str) -> CompressError:
    return CompressError(f"{path} is not a {what} folder of this tool and is not empty: choose an empty or new --out",
                         hint="the tool writes only into folders it created; it never writes among files it does not own")


def is_run_dir(path: Path) -> bool:
    """A folder with a run manifest.json (of any version we can read)."""
    m = _read_manifest(path)
    return isinstance(m, dict) and "manifest_version" in m and "config" in m and "stages" in m


def is_bundle_dir(path: Path) -> bool:
    """A deploy bundle folder written by `compress bundle` (its manifest.json names the bundle and its files)."""
    m = _read_manifest(path)
    return isinstance(m, dict) and "schema_version" in m and "bundle" in m and isinstance(m.get("files"), dict)


def _read_manifest(path: Path):
    f = Path(path) / MANIFEST
    try:
        if not f.is_file() or f.is_symlink() or f.stat().st_size > (64 << 20):
            return None
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def owns(path: Path) -> bool:
    """A run folder, or a folder holding only what a claim leaves (run.lock, compress.log): the tool may write there.
    An empty folder is not: `compress export EMPTY` writes nothing into it."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    if is_run_dir(p):
        return True
    try:
        entries = {e.name for e in os.scandir(p)}
    except OSError:
        return False
    return bool(entries) and entries <= CLAIM_FILES  # an empty folder is not ours until a claim marks it


def _resolve(p: Path, what: str) -> Path:
    """p.resolve(), with a symbolic-link loop (RuntimeError before Python 3.13, OSError after) as a CompressError."""
    try:
        return p.resolve()
    except (RuntimeError, OSError) as exc:
        raise CompressError(f"{what} {p} cannot be resolved: {exc}", hint="a symbolic link loop? give a real folder") from None


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies below it (both resolved)."""
    return a == b or a.is_relative_to(b)


def claim_run_dir(path: str | os.PathLike, data_sources: tuple = ()) -> Path:
    """The run folder for --out, created when new; refused when it is a folder of someone else's files.

    Accepted: a new path (created), an empty folder, a run folder (its manifest.json), or a folder holding only what an
    earlier claim left (run.lock, compress.log). Refused: anything else, and a folder that is, or lies inside, an image
    data folder given as --data/--eval-data (the run's cache/ and checkpoints/ would become classes there)."""
    p = Path(path)
    if not is_writer():  # torchrun ranks but 0 write nothing; rank 0 claims the folder
        return p
    resolved = _resolve(p, "--out")
    for src in data_sources:
        if not src or src == "mnist1d":
            continue
        s = _resolve(Path(src), "--data")
        if s.is_dir() and _inside(resolved, s):
            raise CompressError(f"--out {p} is inside the data folder {src}: the run's files would be read as data",
                                hint="choose an --out outside the data folder")
    if p.is_symlink() and not p.exists():
        raise CompressError(f"--out {p} is a dangling symbolic link", hint="choose an empty or new --out")
    if p.exists():
        if not p.is_dir():
            raise CompressError(f"{p} exists and is not a directory", hint="choose another --out directory")
        try:
            entries = {e.name for e in os.scandir(p)}
        except OSError as exc:
            raise CompressError(f"cannot read the folder {p}: {exc.strerror or exc}", hint="choose another --out directory") from None
        if entries and not entries <= CLAIM_FILES and not is_run_dir(p):
            raise _not_ours(p, "run")
        check_no_links_out(p)
    from ._io import ensure_dir

    ensure_dir(p)
    if not is_run_dir(p):  # mark the folder ours before anything else lands in it (the manifest comes later)
        try:
            os.close(os.open(p / LOCK, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0), 0o644))
        except OSError as exc:
            from ._io import write_error

            raise write_error(exc, p / LOCK) from None
    return p


def check_no_links_out(run_dir: Path) -> None:
    """Refuse a run folder that holds anything but plain files and folders in the places the tool reads and writes: a
    symbolic link (it could point our writes, or our reads, at the user's files), a FIFO or device (a read would hang
    or never end), or a log or lock file with a second hard link (appending or truncating it would change that file).
    A run folder that arrived as an artifact is checked like any other input."""
    import stat

    run_dir = Path(run_dir)
    hint = "copy the run without links (cp -rL), or start a new run"
    for folder in (run_dir, *(run_dir / s for s in RUN_SUBDIRS)):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            raise CompressError(f"{folder} is not a folder; a run folder must hold its own files", hint=hint) from None
        except OSError as exc:
            raise CompressError(f"cannot read the run folder {folder}: {exc.strerror or exc}", hint=hint) from None
        for e in entries:
            st = e.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise CompressError(f"{e.path} is a symbolic link; a run folder must hold its own files", hint=hint)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise CompressError(f"{e.path} is not a regular file or folder (a FIFO, a device or a socket)", hint=hint)
            if folder == run_dir and e.name in CLAIM_FILES and (st.st_nlink > 1 or not stat.S_ISREG(st.st_mode)):
                raise CompressError(f"{e.path} has other hard links (or is not a file); the tool appends to it and would change them", hint=hint)


def check_bundle_out(out: Path, tarball: Path, run_dir: Path, force: bool) -> None:
    """Refuse a bundle --out that would replace the run, or a folder or tarball the tool did not write."""
    o, r = _resolve(out, "--out"), _resolve(Path(run_dir), "the run folder")
    if _inside(r, o):
        raise CompressError(f"--out {out} is the run folder or holds it: the bundle would replace the run",
                            hint="choose a new folder, e.g. the default RUN_DIR/bundle-<target>")
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise CompressError(f"{out} exists and is not a folder", hint="choose a new folder for --out")
        empty = not any(os.scandir(out))
        if not empty and not is_bundle_dir(out):
            raise _not_ours(out, "deploy bundle")
        if not force and not empty:
            raise CompressError(f"{out} already exists", hint="pass --force to replace it, or --out another folder")
        if not empty:  # --force replaces the bundle's own files; what the device or the user added there is theirs
            own = {*_read_manifest(out)["files"], MANIFEST, "SHA256SUMS"}
            extra = sorted(e.name for e in os.scandir(out) if e.name not in own)
            if extra:
                raise CompressError(f"{out} holds files the bundle did not ship ({', '.join(extra[:3])}{', …' if len(extra) > 3 else ''}); "
                                    "--force replaces only a bundle's own files", hint="move those files away first, or choose another --out")
    if tarball.exists() or tarball.is_symlink():
        if not force:
            raise CompressError(f"{tarball} already exists", hint="pass --force to replace it, or --out another folder")
        if not _is_bundle_tarball(tarball, out.name):
            raise CompressError(f"{tarball} exists and is not a bundle tarball this tool wrote; it is left alone",
                                hint="move it away, or choose another --out")


def _is_bundle_tarball(path: Path, name: str) -> bool:
    import tarfile

    if path.is_symlink() or not path.is_file():
        return False
    try:
        with tarfile.open(path, "r:gz") as tar:
            names = tar.getnames()
    except (tarfile.TarError, OSError, EOFError):
        return False
    return bool(names) and f"{name}/{MANIFEST}" in names and all(n.startswith(f"{name}/") for n in names)


def sweep_stale(run_dir: Path) -> list[Path]:
    """Delete what a killed process of ours left in a run folder it owns: half-written files (``.NAME.XXXXXX.tmp``) in
    the run folder and its own sub-folders, and quantize's scratch folders (``.quantize-XXXXXX``). Nothing else, never
    below a folder the tool does not make, and only while the caller holds the run's lock (so no writer is using them)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        return []
    removed = []
    for folder in (run_dir, *(run_dir / s for s in RUN_SUBDIRS)):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for e in os.scandir(folder):
            if e.is_symlink():
                continue
            if _TMP.fullmatch(e.name) and e.is_file():
                Path(e.path).unlink(missing_ok=True)
                removed.append(Path(e.path))
            elif folder == run_dir and _SCRATCH.fullmatch(e.name) and e.is_dir():
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(Path(e.path))
    return removed


_HELD: dict[str, list] = {}  # resolved run folder -> [fd, depth]: a process's own nested calls share its lock


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the run folder's lock while a command writes there; a second process gets a one-line error naming the holder.

    flock, so a killed holder (even SIGKILL) releases it; re-entrant within a process; processes started by the holder
    (torchrun's workers) inherit it. Without a writable folder (a read-only share) there is no writer to exclude."""
    key = str(_resolve(Path(run_dir), "the run folder"))
    if not is_writer() or os.environ.get(_LOCK_ENV) == key and key not in _HELD and _inherited(key):
        yield
        return
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no advisory locks to use
        yield
        return
    if not owns(Path(key)):  # never a lock file among someone else's files: the command refuses that folder anyway
        yield
        return
    import errno
    import stat

    try:
        fd = os.open(Path(key) / LOCK, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):  # read-only or missing: no writer can be there
            yield
            return
        raise CompressError(f"{Path(key) / LOCK} cannot be opened as the run's lock file: {exc.strerror or exc}",
                            hint="remove it if no compress process is running") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # a FIFO, or a hard link to someone's file: never truncate it
        os.close(fd)
        raise CompressError(f"{Path(key) / LOCK} is not the run's own lock file (a special file, or a file with other hard links)",
                            hint="remove it if no compress process is running")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").split()
        os.close(fd)
        who = f" (PID {holder[0]})" if holder and holder[0].isdigit() else ""
        raise CompressError(f"{run_dir} is in use by another compress process{who}",
                            hint="wait for it to finish, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    before = os.environ.get(_LOCK_ENV)
    os.environ[_LOCK_ENV] = key
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            del _HELD[key]
            if before is None:
                os.environ.pop(_LOCK_ENV, None)
            else:
                os.environ[_LOCK_ENV] = before
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def _inherited(key: str) -> bool:
    """Whether the lock on key is held by an ancestor of this process (we were started by the holder)."""
    try:
        holder = int((Path(key) / LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    pid = os.getppid()
    for _ in range(64):  # walk up the process tree (Linux /proc; elsewhere the environment is trusted)
        if pid == holder:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return not Path("/proc/self").exists()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return False
    return False
