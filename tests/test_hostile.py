"""Hostile-input suite (issue 17): a Hypothesis property test over the argv of every command, and explicit hostile cases.

Every example calls compressor.cli.main(argv) in this process, with the working directory set to a sandbox folder that
holds a little of everything a hostile argv can point at (a real .npz, a teacher, a finished run, a device report, a
baseline bundle, a folder of user files, an image folder, a FIFO, links to /dev/zero and to themselves, evil.py that
leaves a marker when imported). Values carry shell injections (`$()`, backquotes, `;`, newlines, `cmd:`) that would
leave a marker file if anything ran them. For each example:

  * the exit code is 0, 2 or 3 (gate: also 1, its "regression"); never 1/4 (a bug) nor 130 (an interrupt: our own
    time-out, i.e. a hang);
  * stdout and stderr hold no traceback and no "internal error";
  * no file of the sandbox (or of the shared teacher and data) is created, changed or deleted outside the folders the
    command may write: its --out (new, empty, or carrying the tool's own marker), a run folder given as RUN_DIR, the
    gate's --junit/--markdown/--update-baseline target;
  * no marker file appears (in the sandbox or in a private folder under the temp dir);
  * nothing is written outside the temp dir: an audit hook refuses such writes while an example runs (so a hostile
    `--out /` cannot touch the machine) and the refusal fails the example. The same hook records every subprocess.

The example counts are reported at the end of the pytest run ("fuzz: N inputs tried (argv N)"); the last test checks
that the whole module tried at least 2,000 argvs. Each example runs under a time limit (SIGALRM) and an address-space
cap, so a hang or a runaway read of /dev/zero fails the example instead of the machine. Shrinking is off: a hang would
cost the time limit on every shrink step; the failing argv is printed as it was drawn.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import resource
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import click
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from conftest import FUZZ_SECONDS, fuzz_count, small_bench

# --- the markers an injected command would leave -------------------------------------------------------------------
MARKERS = Path(tempfile.gettempdir()) / f"compress-hostile-{os.getpid()}-{uuid.uuid4().hex[:8]}"
M = str(MARKERS)
REL_MARKER = "MK"  # a relative marker: lands in the sandbox (the working directory) if anything runs it

EXAMPLE_TIMEOUT_S = 30.0  # per example; a valid `compress run` of the tiny run takes ~2 s, a refusal milliseconds
MEMORY_HEADROOM = 6 << 30  # bytes of address space an example may add (a read of /dev/zero stops here)

# examples per command: sum >= 2,000 within ~3-4 minutes on a 2-core CI machine (measured: see the report in the PR)
BUDGET = {"targets": 400, "report": 370, "bundle": 260, "distill": 250, "bench": 220, "export": 160, "gate": 160, "quantize": 100,
          "(none)": 100, "run": 50}
MIN_TOTAL = 2000
# COMPRESSOR_HOSTILE_SCALE=0.1 runs a tenth of the examples (for a quick local look; the total is then not checked)
SCALE = float(os.environ.get("COMPRESSOR_HOSTILE_SCALE", "1"))
# Under CI the examples are the same every run (a gate must not fail on a draw no one reproduced locally); elsewhere each
# run draws new ones. COMPRESSOR_HOSTILE_EXPLORE=1 draws new ones under CI too; =0 fixes them anywhere.
DERANDOMIZE = os.environ.get("COMPRESSOR_HOSTILE_EXPLORE", "0" if os.environ.get("CI") else "1") == "0"


def _examples(command: str) -> int:
    return max(1, round(BUDGET[command] * SCALE))


_COUNTS: dict[str, int] = {}
_SECONDS: dict[str, float] = {}
_FAILED: set[str] = set()  # commands whose property test found a broken promise (and so stopped early)

EVIL_SRC = f'''
import os
open(os.path.join({M!r}, "evil-imported"), "w").close()


def fn(x):
    return x


def build(*args, **kwargs):
    open(os.path.join({M!r}, "evil-built"), "w").close()
    raise RuntimeError("evil")
'''


def _injections(where: str) -> list[str]:
    """Shell and code injections that leave a marker in `where` if anything runs them."""
    return [f"$(touch {where}/M1)", f"`touch {where}/M2`", f"; touch {where}/M3", f"x;touch {where}/M3b", f"\ntouch {where}/M4 #",
            f"| touch {where}/M5", f"&& touch {where}/M6", f"cmd:touch {where}/M7", f"x' ; touch {where}/M8 ; '", f'x" ; touch {where}/M9 ; "',
            f"$(touch${{IFS}}{where}/M10)", f"{where}/M11\n$(touch {where}/M11)"]


ABS_INJECTIONS = _injections(M)
REL_INJECTIONS = [f"$(touch {REL_MARKER})", f"`touch {REL_MARKER}`", f";touch {REL_MARKER}", f"\ntouch {REL_MARKER}"]
CODE_REFS = ["evil.py:fn", "evil.py:build", "./evil.py:fn", "evil:fn", "evil:build"]  # code a non-code option must not import

# values every option may get: numbers, odd text, paths (relative to the sandbox; none leads out of it but '/' and /dev,
# since writing where the user points is an output's job, and a way out would only litter the machine)
NUMBERS = ["-1", "0", "-0", "1", "2", "0.5", "nan", "NaN", "inf", "-inf", "1e309", "-1e309", "1e-400", "99999999999999999999",
           str(2**64), "0x10", "1_0", "", " ", "1,5", "\u0661", "1.5.2", "1e3x", "+1", "007"]
TEXT = ["", " ", "  x  ", "a b", "'", '"', "x'y\"z", "\\", "-", "--", "-x", "--help=x", "\t", "\r", "\x1b[31mred", "\u202eevil", "\ufeff",
        "x\ny", "é", "😀", "%s%s%n", "{}", "{0}", "[]", "null", "~", "$HOME", "*", "?", "x" * 300,
        os.fsdecode(b"\xff\xfe"), os.fsdecode(b"caf\xe9"), os.fsdecode(b"\x80abc")]
PATHS = ["", ".", "./", "nope/missing.npz", "empty", "user", "user/notes.txt", "user/x", "fifo", "zero", "/dev/zero", "/dev/null",
         "loop", "loopa", "dangling", "linkdir", "linkdir/x/f", "/", "junk.bin", "data.npz", "teacher.pt", "images", "images/a",
         "run", "run/report.json", "run/manifest.json", "rep.json", "dev.json", "dev-nosha.json", "wrong.json", "target.toml",
         "bad.toml", "gate.toml", "baseline", "student.py", "sp ace", "q'uote", "nl\nname", os.fsdecode(b"\xff\xfe"), "-", "--x",
         # WebDataset shard patterns: missing shards, a range that would expand to 10^11 names, nested braces, a junk "shard"
         "s-{0..2}.tar", "s-{0..99999999999}.tar", "s-{a,{0..9999999999}}.tar", "junk.bin.tar", "{}.tar"]
NEW_NAMES = ["o", "o d", "o'\"q", f"o$(touch {REL_MARKER})", "o\nx", os.fsdecode(b"o\xff"), "sub/dir/o", f"o;touch {REL_MARKER}", "-o",
             "o.tar.gz", "o\\x", " o", "o*", "\u202eo"]
RUN_NAMES = ["r", "r d", "r'\"q", f"r$(touch {REL_MARKER})", "r\nx", os.fsdecode(b"r\xff"), f"r;touch {REL_MARKER}", "r`x`", "-r", "r\\y"]

_random_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
_random_bytes = st.binary(max_size=12).filter(lambda b: b"\x00" not in b).map(os.fsdecode)
# random names must stay inside the sandbox: nothing absolute, no '..', no '~'
_random_name = st.one_of(_random_text, _random_bytes).filter(lambda s: not s.startswith(("/", "~")) and ".." not in s)


@dataclasses.dataclass(frozen=True)
class Fresh:
    """A per-example copy of the finished run in the sandbox, under `name`: as it is ('finished'), with a manifest of
    the wrong shape ('wrong', variant i), or with a manifest that names code ('evil')."""

    kind: str
    name: str
    variant: int = 0


def _wrong_manifests():
    """Valid JSON of the wrong shape, whole or one field at a time (applied to a copy of the real manifest)."""
    def whole(v):
        return lambda m: v

    def edit(fn):
        def apply(m):
            fn(m)
            return m
        return apply

    def stage(name, **changes):
        return edit(lambda m: m["stages"].setdefault(name, {}).update(changes))

    return [
        whole([]), whole("run"), whole(1), whole(None), whole({}),
        whole({"manifest_version": 1, "config": [], "stages": {}}),
        whole({"manifest_version": 1, "config": {}, "stages": {}}),
        whole({"manifest_version": 1, "config": "x", "stages": []}),
        edit(lambda m: m["stages"].update(distill="done")),
        edit(lambda m: m.update(stages=[])),
        edit(lambda m: m["config"].update(distill=[])),
        edit(lambda m: m["config"].update(target=["jetson"])),
        edit(lambda m: m["config"].update(target=None)),
        edit(lambda m: m["config"].update(data=None)),
        edit(lambda m: m["config"]["bench"].update(threads=10**12)),
        edit(lambda m: m["config"]["quantize"].update(calibration_rows="all")),
        edit(lambda m: m["inputs"].update(teacher="x")),
        edit(lambda m: m.update(manifest_version="1")),
        stage("quantize", outputs={"onnx_int8": "../../../../../../etc/passwd"}),
        stage("quantize", outputs={"onnx_int8": "/dev/zero"}),
        stage("export", outputs=None),
        stage("export", outputs={"onnx_fp32": ["x"]}),
        stage("distill", result=[]),
        stage("distill", result={"student_record": "x", "num_classes": -1}),
        stage("bench", status=["done"]),
    ]


WRONG_MANIFESTS = _wrong_manifests()


# --- the guard: an audit hook that refuses writes outside the temp dir and records subprocesses ----------------------
class _Guard:
    active = False
    allowed: tuple[str, ...] = ()
    denied: list = []
    spawned: list = []


_GUARD = _Guard()
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "os.rename": 1, "os.truncate": 0, "os.chmod": 0, "os.chown": 0,
                "os.utime": 0, "os.link": 1, "os.symlink": 1, "os.mkfifo": 0, "os.mknod": 0, "shutil.rmtree": 0, "shutil.copyfile": 1,
                "shutil.copytree": 1, "shutil.move": 1}
_SPAWN_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile", "pty.spawn"}


def _outside(path) -> str | None:
    if isinstance(path, int) or path is None:
        return None
    try:
        p = os.path.abspath(os.fsdecode(path))
    except (TypeError, ValueError):
        return None
    return None if any(p == a or p.startswith(a.rstrip("/") + "/") for a in _GUARD.allowed) else p


def _audit(event, args):
    if not _GUARD.active:
        return
    if event == "open":
        flags = args[2] if len(args) > 2 else None
        if not isinstance(flags, int) or not flags & _WRITE_FLAGS:
            return
        bad = _outside(args[0])
    elif event in _PATH_EVENTS:
        if event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.utime") and args[-1] not in (None, -1):
            return  # relative to a directory fd (shutil.rmtree's inner steps): its top was checked
        bad = _outside(args[_PATH_EVENTS[event]]) or (_outside(args[0]) if event in ("os.rename", "shutil.move") else None)
    elif event in _SPAWN_EVENTS:
        _GUARD.spawned.append((event, repr(args)[:300]))
        return
    else:
        return
    if bad:
        _GUARD.denied.append(f"{event} {bad}")
        raise PermissionError(13, "hostile-input test: write outside the temp dir refused", bad)


sys.addaudithook(_audit)


# --- calling the CLI in this process ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str
    seconds: float
    timed_out: bool
    denied: list
    spawned: list


class _Timeout:
    fired = False
    armed = False


def _on_alarm(signum, frame):
    if _Timeout.armed:
        _Timeout.fired = True
        raise KeyboardInterrupt  # main() turns it into exit 130 and "interrupted"; we report a hang


@contextlib.contextmanager
def _memory_cap():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        cap = vm + MEMORY_HEADROOM
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def call(argv: list[str], cwd: Path, timeout: float = EXAMPLE_TIMEOUT_S) -> Result:
    """compressor.cli.main(argv) with cwd, stdout/stderr captured, the guard on, a time limit and a memory cap."""
    from compressor.cli import main

    log = logging.getLogger("compressor")
    handlers = list(log.handlers)
    old_term, old_alarm = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    old_cwd = os.getcwd()
    summary = os.environ.pop("GITHUB_STEP_SUMMARY", None)
    out, err = io.StringIO(), io.StringIO()
    _GUARD.denied, _GUARD.spawned = [], []
    _GUARD.allowed = (os.path.realpath(tempfile.gettempdir()), tempfile.gettempdir(), "/dev/null", "/dev/shm", "/proc/self/fd")
    _Timeout.fired = False
    signal.signal(signal.SIGALRM, _on_alarm)
    t0 = time.perf_counter()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _memory_cap():
            _GUARD.active = True
            _Timeout.armed = True
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                code = main([str(a) for a in argv])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                _Timeout.armed = False
                _GUARD.active = False
    finally:
        seconds = time.perf_counter() - t0
        os.chdir(old_cwd)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGALRM, old_alarm)
        if summary is not None:
            os.environ["GITHUB_STEP_SUMMARY"] = summary
        for h in list(log.handlers):
            if h not in handlers:  # the console handler holds our StringIO; file handlers hold a run's log
                log.removeHandler(h)
                h.close()
    return Result(code, out.getvalue(), err.getvalue(), seconds, _Timeout.fired, list(_GUARD.denied), list(_GUARD.spawned))


# --- the sandbox -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class World:
    """Built once per session: the finished run (with its deploy bundle), the device report, a gate baseline bundle."""

    dir: Path
    run: Path
    device_report: Path
    baseline: Path
    inputs: list[Path]  # the teacher and data the run's manifest names (outside every sandbox; must never change)


@pytest.fixture(scope="session")
def hostile_world(tiny, tmp_path_factory) -> World:
    from compressor import api
    from compressor.config import CompressConfig, DataConfig, DistillConfig

    MARKERS.mkdir(exist_ok=True)
    d = tmp_path_factory.mktemp("hostile-world")
    cfg = CompressConfig(teacher=str(tiny.torchscript), data=DataConfig(source=str(tiny.npz)), target="jetson", preflight=False,
                         distill=DistillConfig(steps=5, evals=1, device="cpu", baseline=False), bench=small_bench(repeat=1))
    run = d / "run"
    api.compress(cfg, out=run)
    api.bundle(run, None)
    bundle = next(p for p in run.iterdir() if p.is_dir() and p.name.startswith("bundle-"))
    dev = d / "device.json"
    code = ("import runpy, sys\nsys.modules['compressor'] = None\n"
            f"sys.argv = ['run_on_device.py', '--runtime', 'onnxruntime', '--min-runs', '3', '--min-duration', '0.001', '--warmup-ms', '1', "
            f"'--out', {str(dev)!r}]\nrunpy.run_path({str(bundle / 'run_on_device.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=d)
    assert proc.returncode == 0 and dev.is_file(), proc.stderr
    r = call(["gate", run, "--baseline", d / "baseline", "--update-baseline"], cwd=d)
    assert r.code == 0 and (d / "baseline").is_dir(), r.err
    yield World(dir=d, run=run, device_report=dev, baseline=d / "baseline", inputs=[Path(tiny.torchscript), Path(tiny.npz)])
    shutil.rmtree(MARKERS, ignore_errors=True)


def _png(path: Path, value: int, size: int = 8) -> None:
    """A tiny 8-bit greyscale PNG, written without PIL."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes([value]) * size for _ in range(size))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _builders(world: World, tiny) -> dict:
    """name in the sandbox -> a function that creates it there."""
    def write(text, mode=None):
        def make(p: Path):
            p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
        return make

    def copy(src):
        return lambda p: shutil.copytree(src, p, symlinks=True) if Path(src).is_dir() else shutil.copyfile(src, p)

    def user(p: Path):
        (p / "x").mkdir(parents=True)
        (p / "notes.txt").write_text("the user's notes\n")
        (p / "x" / "f").write_text("a user file\n")
        (p / "sub").mkdir()
        (p / "sub" / ".f.abcdef.tmp").write_text("a stray temporary-looking user file\n")
        (p / ".g.a1b2c3.tmp").write_text("another\n")

    def images(p: Path):
        for c, v in (("a", 40), ("b", 200)):
            for i in range(3):
                _png(p / c / f"{i}.png", v + i)

    dev = json.loads(world.device_report.read_text())
    nosha = json.loads(json.dumps(dev))
    nosha["bundle"]["onnx_sha256"] = {k: "" for k in dev["bundle"]["onnx_sha256"]}
    rng = np.random.default_rng(0)
    targets = Path(__file__).resolve().parent.parent / "targets"
    return {
        "data.npz": copy(tiny.npz), "teacher.pt": copy(tiny.torchscript), "student.py": copy(tiny.student_file),
        "evil.py": write(EVIL_SRC), "junk.bin": write(rng.bytes(4096)), "empty": lambda p: p.mkdir(), "user": user, "images": images,
        "fifo": lambda p: os.mkfifo(p), "zero": lambda p: p.symlink_to("/dev/zero"), "loop": lambda p: p.symlink_to("loop"),
        "loopa": lambda p: p.symlink_to("loopb"), "loopb": lambda p: p.symlink_to("loopa"), "dangling": lambda p: p.symlink_to("nowhere/at/all"),
        "linkdir": lambda p: p.symlink_to("user"), "run": copy(world.run), "baseline": copy(world.baseline),
        "rep.json": copy(world.run / "report.json"), "dev.json": copy(world.device_report), "dev-nosha.json": write(json.dumps(nosha)),
        "wrong.json": write("[]"), "target.toml": copy(targets / "cpu.toml"), "bad.toml": write("name = [\n\x00"),
        "gate.toml": write("max_accuracy_drop = 1.0\n"),
    }


class Sandbox:
    """The per-test folder every example runs in; restored to its first state after each example."""

    def __init__(self, root: Path, world: World, tiny):
        self.root, self.world = root, world
        self.builders = _builders(world, tiny)
        root.mkdir(parents=True, exist_ok=True)
        for name, make in self.builders.items():
            make(root / name)
        self.pristine = snapshot(root)

    def materialise(self, token):
        """A Fresh token becomes its folder (copied now); anything else stays as it is."""
        if not isinstance(token, Fresh):
            return token
        dst = self.root / token.name
        if dst.is_symlink() or dst.exists():
            _remove(dst)
        if "/" in token.name:
            dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.world.run, dst, symlinks=True)
        mf = dst / "manifest.json"
        if token.kind == "wrong":
            m = WRONG_MANIFESTS[token.variant % len(WRONG_MANIFESTS)](json.loads(mf.read_text()))
            mf.write_text(json.dumps(m))
        elif token.kind == "evil":
            m = json.loads(mf.read_text())
            evil = self.root / "evil.py"
            spec = f"{evil}:fn" if token.variant % 2 == 0 else f"cmd:touch {M}/evil-cmd"
            m["config"]["teacher"] = spec
            try:  # the record the tool itself would write, so the teacher's hash check passes and only the rule stops it
                from compressor.models.query_teacher import query_spec_input

                m["inputs"]["teacher"] = query_spec_input(spec)[0]
            except Exception:
                m["inputs"]["teacher"] = {"path": spec, "kind": "callable", "sha256": hashlib.sha256(evil.read_bytes()).hexdigest()}
            m["config"]["teacher_arch"] = f"{evil}:build"
            rec = m["stages"].get("distill", {}).get("result", {}).get("student_record")
            if isinstance(rec, dict):
                rec["spec"] = f"{evil}:build"
            m["config"]["distill"]["student"] = f"{evil}:build"
            mf.write_text(json.dumps(m))
        return token.name

    def restore(self, now: dict) -> None:
        """Put back every top-level entry that differs from the first state; remove the new ones."""
        tops = {k.split("/", 1)[0] for k in set(now) | set(self.pristine) if now.get(k) != self.pristine.get(k)}
        for name in tops:
            p = self.root / name
            if p.is_symlink() or p.exists():
                _remove(p)
            if name in self.builders:
                self.builders[name](p)
        for f in MARKERS.iterdir() if MARKERS.is_dir() else ():
            f.unlink()
        if tops:
            self.pristine = snapshot(self.root)  # fresh mtimes of what was rebuilt


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        for sub, dirs, _ in os.walk(p):  # a folder a command made read-only must still go
            for x in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(sub, x), 0o755)
        shutil.rmtree(p)
    else:
        p.unlink()


def snapshot(root: Path) -> dict:
    """relative path -> what it is (kind; size, mtime and inode of a file; a link's target). Never follows links and
    never opens a file."""
    out = {}

    def walk(d: str, rel: str):
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            r = f"{rel}{e.name}"
            try:
                st_ = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st_.st_mode):
                out[r] = ("link", os.readlink(e.path))
            elif stat.S_ISDIR(st_.st_mode):
                out[r] = ("dir", stat.S_IMODE(st_.st_mode))
                walk(e.path, r + "/")
            elif stat.S_ISREG(st_.st_mode):  # any write changes mtime_ns; a replacement also the inode
                out[r] = ("file", st_.st_size, st_.st_mtime_ns, st_.st_ino, stat.S_IMODE(st_.st_mode))
            else:
                out[r] = ("special", stat.S_IFMT(st_.st_mode))

    walk(str(root), "")
    return out


def _files_state(paths: list[Path]) -> dict:
    return {str(p): (s.st_size, s.st_mtime_ns, s.st_ino) for p in paths for s in [p.stat()]}


# --- which folders a command may write: the rules of the design (DESIGN.md "Ownership") ------------------------------
def _manifest(p: Path):
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        f = p / "manifest.json"
        if f.is_file() and not f.is_symlink():
            return json.loads(f.read_text(encoding="utf-8"))
    return None


def _kind(p: Path) -> str:
    """What a path was before the command: new, empty, run, bundle, baseline, claim (only run.lock/compress.log), file, other."""
    try:
        if p.is_symlink() and not p.exists():
            return "other"
        if not p.exists():
            return "new"
        if p.is_file():
            return "file"
        if not p.is_dir():
            return "other"
        names = {e.name for e in os.scandir(p)}
    except OSError:
        return "other"
    if not names:
        return "empty"
    if names <= {"run.lock", "compress.log"}:
        return "claim"
    m = _manifest(p)
    if isinstance(m, dict) and "config" in m and "stages" in m:
        return "run"
    if isinstance(m, dict) and "bundle" in m and isinstance(m.get("files"), dict):
        return "bundle"
    if (p / "gate-baseline.json").is_file():
        return "baseline"
    return "other"


def _option_values(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """Every value click could take for these options (--name VALUE and --name=VALUE)."""
    vals = []
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            vals.append(argv[i + 1])
        for n in names:
            if a.startswith(n + "="):
                vals.append(a[len(n) + 1:])
    return vals


def _rel(root: Path, value: str) -> list[str]:
    """The sandbox-relative forms of a path value (as given, and with links resolved); [] when outside the sandbox."""
    out = []
    for p in (os.path.normpath(os.path.join(root, value)), os.path.realpath(os.path.join(root, value))):
        r = os.path.relpath(p, root)
        if r != "." and not r.startswith(".."):
            out.append(r)
    return out


def allowed_outputs(command: str, argv: list[str], root: Path) -> set[str]:
    """Sandbox-relative folders (or files) this argv may create or change."""
    allowed = set()

    def allow(value: str, kinds: tuple[str, ...]):
        if value == "" or "\x00" in value:
            return
        p = root / value
        if _kind(p) in kinds:
            allowed.update(_rel(root, value))

    if command in ("run", "distill", "(none)"):
        outs = _option_values(argv, ("--out",))
        for v in outs:
            allow(v, ("new", "empty", "claim", "run"))
        if not outs:
            allowed.add("runs")  # the default runs/<timestamp>
    elif command in ("export", "quantize", "bench", "report", "bundle"):
        for v in argv:  # the RUN_DIR, wherever click finds it
            allow(v, ("run",))
        if command == "bundle":
            for v in _option_values(argv, ("--out",)):
                allow(v, ("new", "empty", "bundle"))
                tarball = _kind(root / (v + ".tar.gz"))  # written beside the folder; a bundle's own may be replaced
                if tarball == "new" or (tarball == "file" and _kind(root / v) == "bundle"):
                    allowed.update(_rel(root, v + ".tar.gz"))
    elif command == "gate":
        for v in _option_values(argv, ("--junit", "--markdown")):
            allow(v, ("new", "file"))
        if "--update-baseline" in argv:
            for v in _option_values(argv, ("--baseline",)):
                allow(v, ("new", "empty", "baseline") + (("file",) if v.lower().endswith(".json") else ()))
    return allowed


def _under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def check_example(command: str, argv: list[str], res: Result, before: dict, after: dict, allowed: set[str],
                  inputs_before: dict, inputs_after: dict) -> list[str]:
    """Every broken promise of one example, as lines (empty: all kept)."""
    problems = []
    ok_codes = {0, 2, 3} | ({1} if command == "gate" else set())
    if res.timed_out:
        problems.append(f"hung: no answer within {EXAMPLE_TIMEOUT_S:g} s")
    elif res.code not in ok_codes:
        problems.append(f"exit code {res.code} (expected one of {sorted(ok_codes)})")
    for stream, text in (("stderr", res.err), ("stdout", res.out)):
        if "Traceback" in text:
            problems.append(f"a traceback on {stream}")
        if "internal error" in text:
            problems.append(f"'internal error' on {stream}")
    if res.denied:
        problems.append(f"wrote outside the temp dir: {res.denied[:3]}")
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    # a new folder that only leads to an allowed output (mkdir -p of --out sub/dir/o) is part of that output
    outside = [k for k in changed if not _under(k, allowed)
               and not (k not in before and after.get(k, ("",))[0] == "dir" and any(a.startswith(k + "/") for a in allowed))]
    if outside:
        what = [f"{k!r}: {'created' if k not in before else 'deleted' if k not in after else 'changed'}" for k in outside[:6]]
        problems.append(f"files outside the command's output changed ({len(outside)}): {what}")
    markers = [k for k in after if k.rsplit("/", 1)[-1] == REL_MARKER] + (sorted(os.listdir(MARKERS)) if MARKERS.is_dir() else [])
    if "--trust" in argv and command in ("export", "quantize", "bench", "report", "bundle"):
        # `--trust` on a later stage may run code the run names (a student factory, a --teacher-arch), never a black-box teacher
        markers = [m for m in markers if m not in ("evil-imported", "evil-built")]
    if markers:
        problems.append(f"an injected command or import ran: markers {markers}")
    if inputs_before != inputs_after:
        problems.append("the teacher or data file the run names changed")
    return problems


# --- the strategies --------------------------------------------------------------------------------------------------
# cheap valid values for options whose cost grows with the value (an argv must not start hours of work)
CHEAP = {"--steps": ["1", "2"], "--search-steps": ["1", "2"], "--qat-steps": ["0", "1", "2"], "--search": ["0", "1"],
         "--epochs": ["0.01", "0.5"], "--min-runs": ["1", "3"], "--min-duration": ["0", "0.001"], "--repeat": ["1", "2"],
         "--rounds": ["5", "6"], "--round-duration": ["0.001", "0.002"], "--nproc-per-node": ["1"], "--threads": ["1", "2"],
         "--batch-size": ["1", "8", "64"], "--calibration-rows": ["1", "16"], "--query-budget": ["1", "10"], "--query-rounds": ["1", "2"],
         "--max-image-pixels": ["1", "64"], "--batch-sweep": ["1,2", "1", "0", "-1", "1,99999999", "nan", "x", ""],
         "--port": ["1", "22", "65535", "65536"], "--opset": ["13", "17", "23", "12", "24"], "--channels": ["1", "2", "3", "4"],
         "--seed": ["0", "1", str(2**32 - 1), str(2**32)], "--max-float-nodes": ["0", "1", "3"]}
# numbers that are cheap whatever the option: refused, or small
BIGGISH = {"1", "2", "0.5", "+1", "007", "1_0", "\u0661"}  # valid, and for a CHEAP option maybe costly: CHEAP lists its own valid values
CODE_OPTIONS = {"--teacher", "--teacher-arch", "--student", "--teacher-cmd"}  # options whose job is to name code to run
CHOICES_EXTRA = {"--target": ["jetson", "cpu", "orin-nano", "jetson-orin-nano-8gb", "h100-sxm", "raspberry-pi-5", "x86-avx2"],
                 "--recipe": ["tensorrt", "cpu-u8s8", "cpu-s8s8", "cpu-u8s8-reduced", "cpu-dynamic", "cpu-dynamic-reduced", "auto"],
                 "--loss": ["kd", "dkd", "dist", "labels"], "--teacher-output": ["logits", "probs", "topk:2", "topk:0", "topk:-1", "label", "auto"],
                 "--remote": ["user@127.0.0.1", "127.0.0.1", "user@host\n", "-oProxyCommand=x", f"user@$(touch {M}/R1)", "user@host;x",
                              "@", "user@", "a b@c"],
                 "--remote-dir": ["/tmp", "/tmp/x\ny", "", "/tmp/$(x)", "-x", "\x01"],
                 "--ssh-option": ["ConnectTimeout=1", "StrictHostKeyChecking=no", f"ProxyCommand=touch {M}/S1", f"proxycommand=touch {M}/S2",
                                  f"ProxyCommand touch {M}/S3", f" ProxyCommand=touch {M}/S4", f"LocalCommand=touch {M}/S5",
                                  "PermitLocalCommand=yes", f"KnownHostsCommand=/bin/touch {M}/S6", "PKCS11Provider=/tmp/x.so",
                                  f"Match exec \"touch {M}/S7\"", "-oProxyCommand=x", "Include=/etc/passwd", "=", "x"],
                 "--remote-python": ["python3", f"python3; touch {M}/P1", "python3\nx"],
                 "--floor": ["student onnx int8:accuracy>=0.5", "student onnx int8:accuracy>=nan", "x:y>=1", ":>=",
                             "student onnx int8:accuracy>=1e309", "teacher:latency_ms<=inf", "nope:accuracy>=0"],
                 "--student": ["teacher:every-other", "student.py:build", "student.py:boom", "student.py:not_a_module", "student.py:nope"],
                 "--hint": ["1=0", "x=y", "=", "a==b"], "--output": ["0", "logits", "-1", "99"], "--exclude-nodes": ["x,y", ",", "Gemm_0"],
                 "--image-size": ["8x8", "100000x100000", "0x8", "-1x8", "8", "8x8x8", "nanxnan", "infx1", "1e309x1", "x"],
                 "--mean": ["0.5", "0.5,0.5,0.5", "nan", "inf", "1,2,3,4", ""], "--std": ["0.5", "0", "-1", "inf", "nan", "1e-400", "0.2,0.2"]}


def _option_table(command: str) -> list[tuple[str, object]]:
    """(option name, click type or 'flag') for every option of a command, read from the CLI itself."""
    from compressor.cli import cli

    if command == "(none)":
        params = cli.params
    else:
        params = cli.commands[command].params
    out = []
    for p in params:
        if not isinstance(p, click.Option) or p.name in ("help", "version", "debug"):
            continue
        for name in [*p.opts, *p.secondary_opts]:
            out.append((name, "flag" if p.is_flag else p.type))
    return out


def _values_for(name: str, ptype, command: str):
    """A strategy of values for one option: its real values, hostile numbers, text and paths."""
    code = name in CODE_OPTIONS
    text = st.sampled_from(TEXT + ABS_INJECTIONS + REL_INJECTIONS + ([] if code else CODE_REFS))
    paths = st.sampled_from(PATHS)
    parts = []
    if name in CHEAP:
        parts.append(st.sampled_from(CHEAP[name]))
    if name in CHOICES_EXTRA:
        parts.append(st.sampled_from(CHOICES_EXTRA[name]))
    if isinstance(ptype, click.Choice):
        parts.append(st.sampled_from(list(ptype.choices)))
    if isinstance(ptype, (click.types.IntParamType, click.types.FloatParamType)):
        nums = [n for n in NUMBERS if n not in BIGGISH] if name in CHEAP else NUMBERS
        parts += [st.sampled_from(nums), st.sampled_from(nums), text]
    else:
        parts += [text, paths, paths, _random_name]
    values = st.one_of(parts)
    if code:  # never code of ours for an option whose job is to run code: that would be the user's wish, not an injection
        values = values.filter(lambda v: "evil" not in v)
    if name == "--teacher-cmd":  # a real command is the option's job; only values no shell-free runner can execute
        values = values.filter(lambda v: not _is_runnable(v))
    if name in ("--data", "--eval-data"):  # never the built-in mnist1d: it takes a minute to generate
        values = values.filter(lambda v: v.strip().lower() != "mnist1d")
    return values


def _is_runnable(value: str) -> bool:
    try:
        argv = shlex.split(value)
    except ValueError:
        return False
    return bool(argv) and (shutil.which(argv[0]) is not None or os.path.exists(argv[0]))


_JUNK = st.one_of(st.sampled_from(["--bogus", "-x", "--", "--out", "--teacher=", "-h", "--help", "--version", "-qq", "--debugx",
                                   "gate", "---", "--=x", "-", *REL_INJECTIONS, *ABS_INJECTIONS]), _random_name)

_PIPELINE_BASE = ["--teacher", "teacher.pt", "--data", "data.npz", "--steps", "1", "--batch-size", "8", "--skip-preflight", "--no-baseline"]


@st.composite
def _run_dir(draw, stage: str):
    """RUN_DIR: mostly a fresh copy of the finished run (some broken, some naming code), sometimes a hostile path."""
    name = draw(st.sampled_from(RUN_NAMES))
    kind = draw(st.sampled_from(["finished"] * 6 + ["wrong"] * 2 + ["evil"] * 2 + ["path"] * 3))
    if kind == "path":
        return draw(st.one_of(st.sampled_from(PATHS), _random_name))
    return Fresh(kind, name, draw(st.integers(0, len(WRONG_MANIFESTS) - 1)))


@st.composite
def argv_strategy(draw, command: str):
    """One argv for `command`: a valid, cheap base with one to three options set to drawn values, sometimes junk."""
    table = _option_table(command)
    if command in ("run", "distill"):
        out = draw(st.sampled_from(NEW_NAMES))
        base = [command] if command == "distill" or draw(st.booleans()) else []  # `compress --teacher …` is `compress run …`
        base += [*_PIPELINE_BASE, "--out", out]
    elif command == "(none)":
        base = []
    elif command == "targets":
        base = ["targets"] + draw(st.sampled_from([[], [], ["jetson"], ["cpu", "--text"], ["target.toml"]]))
    elif command == "gate":
        cur = draw(st.one_of(st.builds(lambda n: Fresh("finished", n), st.sampled_from(RUN_NAMES)), st.sampled_from(["rep.json", "run"]),
                             _run_dir("gate")))
        bl = draw(st.one_of(st.builds(lambda n: Fresh("finished", "b-" + n), st.sampled_from(RUN_NAMES)),
                            st.sampled_from(["rep.json", "run", "baseline"]), _run_dir("gate")))
        if isinstance(bl, Fresh) and isinstance(cur, Fresh) and bl.name == cur.name:
            bl = Fresh(bl.kind, "b-" + bl.name, bl.variant)
        base = ["gate", cur, "--baseline", bl, "--rounds", "5", "--round-duration", "0.001"]
        if draw(st.integers(0, 3)):  # re-timing (a quarter of the examples) costs about a second
            base.append("--absolute-latency")
    else:
        base = [command, draw(_run_dir(command))]
        if command in ("export", "bench", "bundle") and draw(st.integers(0, 3)) == 0:
            base.append("--force")  # redo the stage (a fraction of a second here): the work itself meets the values
    n = draw(st.integers(0 if command in ("targets", "(none)") else 1, 3))
    extra = []
    for _ in range(n):
        how = draw(st.sampled_from(["option"] * 7 + ["junk"]))
        if how == "junk" or not table:
            extra.append(draw(_JUNK))
            continue
        name, ptype = draw(st.sampled_from(table))
        extra.append(name)
        if ptype != "flag":
            value = draw(_values_for(name, ptype, command))
            if draw(st.integers(0, 9)) == 0 and not value.startswith("-"):
                extra[-1] = f"{name}={value}"
            else:
                extra.append(value)
    if command == "(none)":  # group options and junk; never a bare `compress`, which is the whole default pipeline
        return extra + [draw(st.sampled_from(["--no-such-option", "--teacher=", "-Z", "--out"]))]
    prefix = draw(st.sampled_from([[], [], [], ["-q"], ["--quiet"]]))
    return prefix + base + extra


# --- the property tests ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _fast_bench_defaults():
    """`compress run` benches with BenchConfig's defaults (seconds per model): make them tiny for this module only.
    The argv, the files and the checks are the same; only the timing loop is shorter."""
    import inspect

    from compressor.config import BenchConfig

    fast = {"min_runs": 3, "min_duration_s": 0.0, "warmup_ms": 0.0, "warmup_runs": 1, "repeat": 1}
    init = BenchConfig.__init__
    old = init.__defaults__
    sig = inspect.signature(init)
    init.__defaults__ = tuple(fast.get(n, p.default) for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty)
    yield
    init.__defaults__ = old


def _check_one(sandbox: Sandbox, command: str, tokens: list) -> None:
    argv = [sandbox.materialise(t) for t in tokens]
    note(f"argv: {argv!r}")
    before = snapshot(sandbox.root)
    allowed = allowed_outputs(command, argv, sandbox.root)
    inputs_before = _files_state(sandbox.world.inputs)
    res = call(argv, cwd=sandbox.root)
    after = snapshot(sandbox.root)
    problems = check_example(command, argv, res, before, after, allowed, inputs_before, _files_state(sandbox.world.inputs))
    markers = sorted(os.listdir(MARKERS)) if MARKERS.is_dir() else []
    sandbox.restore(after)
    _COUNTS[command] = _COUNTS.get(command, 0) + 1
    _SECONDS[command] = _SECONDS.get(command, 0.0) + res.seconds
    fuzz_count("argv")
    FUZZ_SECONDS["argv"] = FUZZ_SECONDS.get("argv", 0.0) + res.seconds
    if problems:
        _FAILED.add(command)
    assert not problems, (f"compress {' '.join(shlex.quote(a) for a in argv)}\n  exit {res.code} in {res.seconds:.1f} s\n  "
                          + "\n  ".join(problems) + f"\n  markers: {markers}\n  stderr: {res.err[-1500:]}")


def _property_test(command: str):
    @settings(max_examples=_examples(command), deadline=None, derandomize=DERANDOMIZE, print_blob=True, database=None,
              phases=[Phase.explicit, Phase.reuse, Phase.generate],
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large])
    @given(tokens=argv_strategy(command))
    def test(hostile_sandbox, tokens):
        _check_one(hostile_sandbox, command, tokens)

    test.__name__ = f"test_hostile_argv_{command.strip('()').replace('-', '_')}"
    test.__doc__ = f"Hostile argv for `compress {command}`: exit 0/2/3, no traceback, nothing outside its output touched, no marker."
    return test


@pytest.fixture
def hostile_sandbox(hostile_world, tiny, tmp_path) -> Sandbox:
    return Sandbox(tmp_path / "sandbox", hostile_world, tiny)


for _cmd in BUDGET:
    _t = _property_test(_cmd)
    globals()[_t.__name__] = _t
del _cmd, _t


# --- explicit hostile cases (the defects listed in issue 17) ---------------------------------------------------------
def _expect(sandbox: Sandbox, command: str, argv: list, codes=(2,), must_survive: list[str] = (), allowed: set[str] | None = None,
            timeout: float = EXAMPLE_TIMEOUT_S) -> Result:
    """Run argv in the sandbox and check the example's promises, plus: the exit code is one of `codes`, and
    every path in must_survive is unchanged (even if it lies inside an allowed output)."""
    argv = [sandbox.materialise(t) for t in argv]
    before = snapshot(sandbox.root)
    allowed = allowed_outputs(command, argv, sandbox.root) if allowed is None else allowed
    inputs_before = _files_state(sandbox.world.inputs)
    res = call(argv, cwd=sandbox.root, timeout=timeout)
    after = snapshot(sandbox.root)
    problems = check_example(command, argv, res, before, after, allowed, inputs_before, _files_state(sandbox.world.inputs))
    if not res.timed_out and res.code not in codes:
        problems.append(f"exit code {res.code}, expected {list(codes)}")
    for s in must_survive:
        if before.get(s) != after.get(s) or s not in after:
            problems.append(f"{s!r} did not survive: {before.get(s)} -> {after.get(s)}")
    sandbox.restore(after)
    assert not problems, (f"compress {' '.join(shlex.quote(str(a)) for a in argv)}\n  exit {res.code}\n  " + "\n  ".join(problems)
                          + f"\n  stderr: {res.err[-1500:]}")
    return res


def test_bundle_force_keeps_user_files_in_out(hostile_sandbox):
    """bundle RUN --out D --force, where D holds the user's D/x/f: refused, and D/x/f survives."""
    sb = hostile_sandbox
    _expect(sb, "bundle", ["bundle", Fresh("finished", "r"), "--out", "user", "--force"], must_survive=["user/x/f", "user/notes.txt"])


@pytest.mark.parametrize("out", ["r", "r/", ".", "/"])
def test_bundle_out_at_the_run_or_above_is_refused(hostile_sandbox, out):
    """bundle RUN --out RUN --force (or a folder holding the run): refused, and the run survives whole (its lock and
    log aside, which a command keeps in a run it opens)."""
    sb = hostile_sandbox
    sb.materialise(Fresh("finished", "r"))
    claim = {"r/run.lock", "r/compress.log"}
    keep = [k for k in snapshot(sb.root) if (k == "r" or k.startswith("r/")) and k not in claim]
    _expect(sb, "bundle", ["bundle", "r", "--out", out, "--force"], must_survive=keep, allowed=claim)


@pytest.mark.parametrize("command", ["run", "distill"])
@pytest.mark.parametrize("out", ["user", "linkdir", "images/a", "."])
def test_out_at_a_folder_of_user_files_is_refused(hostile_sandbox, command, out):
    """--out at an existing non-empty folder that is no run: exit 2, its files untouched."""
    _expect(hostile_sandbox, command, [command, *_PIPELINE_BASE, "--out", out], allowed=set())


@pytest.mark.parametrize("out", ["images", "images/", "images/a", "images/new"])
def test_out_in_the_image_data_folder_is_refused(hostile_sandbox, out):
    """--out equal to (or inside) the image folder given as --data: exit 2 (its cache/ would become a class)."""
    argv = ["distill", "--teacher", "teacher.pt", "--data", "images", "--steps", "1", "--skip-preflight", "--no-baseline", "--out", out]
    res = _expect(hostile_sandbox, "distill", argv, allowed=set())
    assert "data folder" in res.err, res.err


@pytest.mark.parametrize("command", ["run", "distill"])
def test_out_root_is_refused_and_nothing_is_deleted(hostile_sandbox, command):
    """--out /: exit 2; nothing written or deleted anywhere (the guard refuses any write outside the temp dir)."""
    res = _expect(hostile_sandbox, command, [command, *_PIPELINE_BASE, "--out", "/"], allowed=set())
    assert not res.denied


def test_stray_temporaries_below_a_user_folder_are_never_deleted(hostile_sandbox):
    """--out at a folder holding .x.XXXXXX.tmp files below it: refused, and they are still there."""
    _expect(hostile_sandbox, "distill", ["distill", *_PIPELINE_BASE, "--out", "user", "--force"],
            must_survive=["user/sub/.f.abcdef.tmp", "user/.g.a1b2c3.tmp"], allowed=set())


@pytest.mark.parametrize("command", ["export", "quantize", "bench", "bundle"])
def test_a_stage_never_deletes_temporaries_in_a_user_subfolder_of_a_run(hostile_sandbox, command):
    """A run folder holding the user's own sub-folder with .x.XXXXXX.tmp files: a stage run with --force leaves them."""
    sb = hostile_sandbox
    sb.materialise(Fresh("finished", "r"))
    (sb.root / "r" / "mine").mkdir()
    (sb.root / "r" / "mine" / ".notes.abc123.tmp").write_text("mine\n")
    (sb.root / "r" / "mine" / "deeper").mkdir()
    (sb.root / "r" / "mine" / "deeper" / ".x.zz9999.tmp").write_text("mine too\n")
    _expect(sb, command, [command, "r", "--force"], codes=(0,), must_survive=["r/mine/.notes.abc123.tmp", "r/mine/deeper/.x.zz9999.tmp"])


@pytest.mark.parametrize("command", ["run", "distill"])
@pytest.mark.parametrize("spec", [f"cmd:touch {M}/T1", f"cmd:touch {REL_MARKER}", f"cmd:sh -c 'touch {M}/T2'"])
def test_teacher_cmd_prefix_is_refused(hostile_sandbox, command, spec):
    """--teacher 'cmd:…' is no way to name a command (only --teacher-cmd is): refused, nothing runs."""
    argv = [command, "--teacher", spec, "--data", "data.npz", "--steps", "1", "--batch-size", "8", "--skip-preflight", "--no-baseline",
            "--out", "o"]
    res = _expect(hostile_sandbox, command, argv, allowed={"o"})
    assert not res.spawned, res.spawned


@pytest.mark.parametrize("option,value", [("--seed", "-1"), ("--seed", str(2**64)), ("--std", "inf"), ("--std", "nan"), ("--std", "0"),
                                          ("--mean", "inf"), ("--image-size", "100000x100000"), ("--image-size", "0x0"),
                                          ("--lr", "inf"), ("--lr", "nan"), ("--epochs", "inf"), ("--temperature", "nan"),
                                          ("--alpha", "nan"), ("--int8-tolerance", "inf"), ("--batch-size", str(2**63))])
def test_out_of_range_numbers_are_exit_2(hostile_sandbox, option, value):
    argv = ["distill", *_PIPELINE_BASE, "--out", "o", option, value]
    _expect(hostile_sandbox, "distill", argv, allowed={"o"})


@pytest.mark.parametrize("argv", [["distill", *_PIPELINE_BASE, "--out", "o", "--target", "fifo"],
                                  ["distill", *_PIPELINE_BASE, "--out", "o", "--target", "zero"],
                                  ["distill", *_PIPELINE_BASE, "--out", "o", "--target", "/dev/zero"],
                                  ["targets", "fifo"], ["targets", "/dev/zero"], ["targets", "zero", "--text"]],
                         ids=["distill-fifo", "distill-zero-link", "distill-dev-zero", "targets-fifo", "targets-dev-zero", "targets-zero-text"])
def test_target_that_is_a_fifo_or_a_device_is_refused_without_hanging(hostile_sandbox, argv):
    _expect(hostile_sandbox, argv[0], argv, allowed={"o"}, timeout=20)


# which commands must refuse each field-level wrong shape (they read that field); the others may go on (exit 0) but
# never crash. Whole-document wrong shapes (variants 0-9) and a wrong manifest_version (17) are refused by every command.
_MUST_REFUSE = {10: "export quantize bench bundle", 11: "export quantize bench bundle", 12: "export quantize bench bundle",
                13: "export quantize bench", 14: "bench", 15: "quantize", 16: "quantize bench", 18: "bench bundle", 19: "bench bundle",
                20: "quantize bench bundle", 21: "quantize bench bundle", 22: "export bench", 23: "export bench",
                24: ""}


def _wrong_codes(variant: int, command: str) -> tuple:
    if variant <= 9 or variant == 17 or command in _MUST_REFUSE.get(variant, "").split():
        return (2,)
    return (0, 2)


@pytest.mark.parametrize("command", ["export", "quantize", "bench", "report", "bundle"])
@pytest.mark.parametrize("variant", range(len(WRONG_MANIFESTS)))
def test_manifest_of_the_wrong_shape_is_exit_2(hostile_sandbox, command, variant):
    """A run whose manifest.json is valid JSON of the wrong shape: exit 2 where the command needs what is wrong (never
    an internal error, a traceback, or a file touched outside the run)."""
    argv = [command, Fresh("wrong", "r", variant), *(["--force"] if command != "report" else [])]
    _expect(hostile_sandbox, command, argv, codes=_wrong_codes(variant, command))


@pytest.mark.parametrize("variant,retime", [(v, False) for v in range(len(WRONG_MANIFESTS))] + [(v, True) for v in (0, 5, 8, 16, 17, 23)])
def test_gate_on_a_run_with_a_manifest_of_the_wrong_shape_never_crashes(hostile_sandbox, variant, retime):
    """gate with such a run as CURRENT: exit 0 (the gate reads only what it needs), 1 (its verdict "regression": 5 rounds of
    1 ms re-time the same models, and such short rounds can read as a slowdown) or 2, never 4 (its own error)."""
    argv = ["gate", Fresh("wrong", "r", variant), "--baseline", "run", "--rounds", "5", "--round-duration", "0.001"]
    _expect(hostile_sandbox, "gate", argv + ([] if retime else ["--absolute-latency"]), codes=(0, 1, 2))


@pytest.mark.parametrize("name", ["dev-nosha.json", "empty-dict", "missing", "rep.json", "wrong.json"])
def test_report_merge_of_a_device_report_without_checksums_is_exit_2(hostile_sandbox, name):
    """compress report RUN --merge DEV where DEV's bundle.onnx_sha256 is empty (or absent, or no device report): exit 2,
    the run's report unchanged."""
    sb = hostile_sandbox
    if name in ("empty-dict", "missing"):
        dev = json.loads((sb.root / "dev.json").read_text())
        if name == "missing":
            del dev["bundle"]["onnx_sha256"]
        else:
            dev["bundle"]["onnx_sha256"] = {}
        (sb.root / f"{name}.json").write_text(json.dumps(dev))
        name = f"{name}.json"
        sb.pristine = snapshot(sb.root)
    sb.materialise(Fresh("finished", "r"))
    _expect(sb, "report", ["report", "r", "--merge", name], must_survive=["r/report.json", "r/report.md"])


def test_report_merge_of_the_real_device_report_works(hostile_sandbox):
    """The control case: the unedited device report merges (exit 0)."""
    _expect(hostile_sandbox, "report", ["report", Fresh("finished", "r"), "--merge", "dev.json"], codes=(0,))


@pytest.mark.parametrize("extra", [["--remote", "user@host\n"], ["--remote", "user@host\nProxyCommand=x"], ["--remote", "-oProxyCommand=x"],
                                   ["--remote", "user@127.0.0.1", "--remote-dir", "/tmp/x\ny"],
                                   ["--remote", "user@127.0.0.1", "--remote-dir", f"/tmp\ntouch {M}/RD"],
                                   ["--remote", "user@127.0.0.1", "--ssh-option", f"ProxyCommand=touch {M}/PC"],
                                   ["--remote", "user@127.0.0.1", "--ssh-option", f"proxycommand touch {M}/PC2"],
                                   ["--remote", "user@127.0.0.1", "--ssh-option", f"LocalCommand=touch {M}/LC"],
                                   ["--remote", "user@127.0.0.1", "--ssh-option", f"KnownHostsCommand=/usr/bin/touch {M}/KH"],
                                   ["--remote", "user@127.0.0.1", "--ssh-option", f"Match exec \"touch {M}/MX\""]],
                         ids=["host-newline", "host-newline-option", "host-dash", "dir-newline", "dir-newline-cmd", "proxycommand",
                              "proxycommand-space", "localcommand", "knownhostscommand", "match-exec"])
def test_remote_bench_with_hostile_host_dir_or_ssh_option_is_exit_2_and_runs_nothing(hostile_sandbox, extra):
    res = _expect(hostile_sandbox, "bench", ["bench", Fresh("finished", "r"), "--min-runs", "1", "--min-duration", "0", *extra])
    assert not res.spawned, f"started {res.spawned}"


@pytest.mark.parametrize("command", ["export", "quantize", "bench", "report", "bundle"])
@pytest.mark.parametrize("variant", [0, 1], ids=["evil-py", "evil-cmd"])
def test_stages_never_run_code_a_run_folder_names(hostile_sandbox, command, variant):
    """A run whose manifest names evil.py (teacher, teacher-arch, student) or a cmd: teacher: no later stage runs it
    (they may refuse the run, exit 2, or use the saved code-free copies, exit 0)."""
    res = _expect(hostile_sandbox, command, [command, Fresh("evil", "r", variant), *(["--force"] if command != "report" else [])], codes=(0, 2))
    assert not res.spawned, f"started {res.spawned}"


def test_argv_examples_total():
    """The property tests above tried >= 2,000 argvs in all (only checked when every one of them ran)."""
    if SCALE != 1:
        pytest.skip(f"COMPRESSOR_HOSTILE_SCALE={SCALE:g}")
    if set(_COUNTS) != set(BUDGET):
        pytest.skip(f"only {sorted(_COUNTS)} of the property tests ran")
    if _FAILED:
        pytest.skip(f"the property tests of {sorted(_FAILED)} failed, so stopped early: see their failures")
    total = sum(_COUNTS.values())
    per = ", ".join(f"{k} {v} ({_SECONDS[k]:.0f} s)" for k, v in sorted(_COUNTS.items()))
    print(f"hostile argv: {total} examples; {per}")
    assert total >= MIN_TOTAL, f"only {total} hostile argvs were tried ({per})"
