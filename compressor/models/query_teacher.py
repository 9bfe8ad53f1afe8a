"""Black-box teachers you can only query: a Python callable ('file.py:fn' / 'package.module:fn') or a command
('cmd:CMD ARGS', from --teacher-cmd) that reads a batch as .npy bytes on stdin and writes its answer as .npy bytes
on stdout, one process per batch. Their answers are (N,) class ids or (N, C) scores; what the scores mean is
DistillConfig.teacher_output's business (compressor/distill/blackbox.py), not theirs."""
from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._io import sha256_file, sha256_json
from ..errors import CompressError
from ._spec import load_callable
from .teacher_base import Teacher

CMD_PREFIX = "cmd:"
COMMAND_TIMEOUT_S = 600.0  # per call: a command that hangs is an error, not a stuck run
MAX_CLASS_ID = 2**31 - 1  # a class id above this cannot index a real output layer (nor, as a float, convert to int64 safely)


def is_command_spec(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(CMD_PREFIX)


def is_query_spec(spec: str | None) -> bool:
    """True for a teacher that is a callable spec ('x.py:fn', 'pkg.mod:fn') or a command ('cmd:...'), not a model file."""
    if not isinstance(spec, str):
        return False
    if is_command_spec(spec):
        return True
    # 'x.py:fn' names a function; 'C:\\model.pt' or a missing 'model.pt' stays a (missing) model file
    return ":" in spec and spec.rpartition(":")[2].isidentifier() and not Path(spec).exists()


def _callable_file(spec: str) -> Path | None:
    """The .py file of a 'path/to/file.py:fn' spec; None for 'package.module:fn'."""
    target = spec.rpartition(":")[0]
    return Path(target) if target.endswith(".py") or "/" in target or "\\" in target else None


def _argv(spec: str) -> list[str]:
    cmd = spec[len(CMD_PREFIX):]
    try:
        argv = shlex.split(cmd)
    except ValueError as exc:
        raise CompressError(f"--teacher-cmd '{cmd}' cannot be parsed: {exc}", hint="quote it as a shell would, e.g. \"python teacher.py --fast\"") from None
    if not argv:
        raise CompressError("--teacher-cmd is empty", hint="give the command that answers a batch, e.g. --teacher-cmd \"python teacher.py\"")
    return argv


def _executable(argv0: str, cwd: str | None) -> Path:
    if os.sep in argv0 or (os.altsep and os.altsep in argv0):
        p = Path(cwd or ".", argv0) if not os.path.isabs(argv0) else Path(argv0)
        if p.is_file() and os.access(p, os.X_OK):
            return p.resolve()
        found = None
    else:
        found = shutil.which(argv0)
    if not found:
        raise CompressError(f"--teacher-cmd: '{argv0}' is not an executable command" + ("" if os.sep in argv0 else " on PATH"),
                            hint="give the full path, or make the script executable (chmod +x)")
    return Path(found).resolve()


def query_spec_input(spec: str, cwd: str | None = None) -> tuple[dict, str]:
    """(the manifest's record of the teacher input, the spec to store in the config) for a callable or command spec.

    A file callable: the .py file's hash (the spec is made absolute). A module callable: the spec string's hash.
    A command: the hash of the command line and of every argument that names an existing file (relative to the
    directory it was started in, which later stages run it from)."""
    if is_command_spec(spec):
        cwd = cwd or os.getcwd()
        argv = _argv(spec)
        _executable(argv[0], cwd)
        files = {}
        for i, a in enumerate(argv):
            p = Path(a) if os.path.isabs(a) else Path(cwd, a)
            if (i > 0 or os.sep in a) and p.is_file():
                files[a] = sha256_file(p)
        return {"path": spec, "kind": "command", "cwd": cwd, "sha256": sha256_json({"argv": argv, "files": files})}, spec
    file = _callable_file(spec)
    if file is None:
        return {"path": spec, "kind": "callable", "sha256": sha256_json(spec)}, spec
    if not file.is_file():
        raise CompressError(f"teacher {file} does not exist" if not file.exists() else f"teacher {file} is not a file",
                            hint="a callable teacher is file.py:function or package.module:function")
    spec = f"{file.resolve()}:{spec.rpartition(':')[2]}"
    return {"path": spec, "kind": "callable", "sha256": sha256_file(file)}, spec


@dataclass
class QueryTeacher(Teacher):
    """A teacher that can only be asked for answers; counts every call and row sent to it."""

    spec: str = ""
    fn: object | None = None  # the Python callable, for format 'callable'
    argv: list[str] | None = None  # the command, for format 'command'
    cwd: str | None = None
    timeout_s: float = COMMAND_TIMEOUT_S
    calls: int = field(default=0)
    rows: int = field(default=0)

    @property
    def white_box(self) -> bool:
        return False

    @property
    def runtime(self) -> str:
        return "python" if self.format == "callable" else "subprocess"

    @property
    def name(self) -> str:
        return f"--teacher-cmd '{self.spec[len(CMD_PREFIX):]}'" if self.format == "command" else f"teacher '{self.spec}'"

    def num_params(self) -> int | None:
        return None

    def answers(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """The teacher's raw answers for the rows of x, one call per batch: (N,) int64 class ids or (N, C) float32 scores."""
        outs = []
        for i in range(0, len(x), batch_size):
            xb = np.ascontiguousarray(x[i:i + batch_size])
            outs.append(check_answer(self._run(xb), len(xb), self.name))
            self.calls += 1
            self.rows += len(xb)
        if not outs:
            return np.zeros((0,), np.int64)
        if len({o.ndim for o in outs}) > 1 or len({o.shape[1:] for o in outs}) > 1:
            raise CompressError(f"{self.name} answers batches in different shapes ({', '.join(str(o.shape[1:]) for o in outs[:3])})",
                                hint="answer every batch with (N,) class ids or (N, classes) scores, always the same")
        return np.concatenate(outs)

    def logits(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """(N, C) scores, as the white-box teachers give; class-id answers need --teacher-output label."""
        out = self.answers(x, batch_size)
        if out.ndim != 2:
            raise CompressError(f"{self.name} answers class ids (shape (N,)), not (N, classes) scores",
                                hint="pass --teacher-output label for a teacher that answers labels only")
        return self.as_logits(out)

    def _run(self, xb: np.ndarray):
        if self.format == "callable":
            try:
                return self.fn(xb)
            except CompressError:
                raise
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise CompressError(f"{self.name} raised {type(exc).__name__} on a batch of shape {xb.shape}: {first}",
                                    hint="the callable receives a numpy batch and must return a numpy array") from exc
        return self._run_command(xb)

    def _run_command(self, xb: np.ndarray):
        buf = io.BytesIO()
        np.save(buf, xb, allow_pickle=False)
        try:
            # a list of arguments and no shell: nothing in the command or the data is ever interpreted by a shell
            proc = subprocess.run(self.argv, input=buf.getvalue(), capture_output=True, cwd=self.cwd, timeout=self.timeout_s, shell=False)
        except subprocess.TimeoutExpired:
            raise CompressError(f"{self.name} did not answer a batch of {len(xb)} rows within {self.timeout_s:g} s",
                                hint="check that it reads the whole of stdin and writes one .npy array to stdout", kind="runtime") from None
        except OSError as exc:
            raise CompressError(f"{self.name} cannot be started: {exc.strerror or exc}", hint="check the command and its permissions") from None
        if proc.returncode != 0:
            raise CompressError(f"{self.name} exited with code {proc.returncode}: {_stderr_line(proc.stderr)}",
                                hint="run the command by hand on a batch saved with numpy.save to see why")
        try:
            return np.load(io.BytesIO(proc.stdout), allow_pickle=False)
        except Exception as exc:
            err = _stderr_line(proc.stderr)
            raise CompressError(f"{self.name} did not write a .npy array to stdout ({type(exc).__name__}: {str(exc)[:120]}; "
                                f"{len(proc.stdout)} bytes){'; stderr: ' + err if err != '(no stderr)' else ''}",
                                hint="write the answer with numpy.save(sys.stdout.buffer, answer) and nothing else to stdout") from None


def _stderr_line(stderr: bytes) -> str:
    """The line of stderr that says what went wrong: its first, or a Python traceback's last."""
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return "(no stderr)"
    return (lines[-1] if lines[0].startswith("Traceback") else lines[0])[:300]


def check_answer(ans, n: int, who: str) -> np.ndarray:
    """Validate one batch's answer: (n,) non-negative integer class ids or (n, C) scores without NaN."""
    try:
        arr = np.asarray(ans.detach().cpu().numpy() if hasattr(ans, "detach") else ans)
    except Exception:
        arr = None
    if arr is None or arr.dtype.kind not in "biuf":
        kind = type(ans).__name__ if arr is None else f"an array of dtype {arr.dtype}"
        raise CompressError(f"{who} answered {kind}, not a numeric array", hint="return a numpy array: (N,) class ids or (N, classes) scores")
    if arr.ndim not in (1, 2) or len(arr) != n or (arr.ndim == 2 and arr.shape[1] == 0):
        raise CompressError(f"{who} answered shape {arr.shape} for a batch of {n} rows",
                            hint=f"answer ({n},) class ids or ({n}, classes) scores, one row per input row")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        bad = int(np.isnan(arr).reshape(n, -1).any(1).sum())
        raise CompressError(f"{who} answered NaN for {bad} of {n} rows", hint="check the data's scale and preprocessing: it should match what the teacher expects")
    if arr.ndim == 1:
        if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise CompressError(f"{who} answered a vector of non-integer values; class ids must be whole numbers",
                                hint="answer (N,) class ids, or (N, classes) scores with --teacher-output logits|probs|topk:K")
        if (arr < 0).any():
            raise CompressError(f"{who} answered negative class ids (min {arr.min()})", hint="class ids must be 0..classes-1")
        if len(arr) and arr.max() > MAX_CLASS_ID:  # beyond int64 (a float 1e30) or any sane number of classes
            raise CompressError(f"{who} answered class id {arr.max():.0f}, which is out of range (ids above {MAX_CLASS_ID:,} are refused)",
                                hint="class ids must be 0..classes-1; check that the teacher answers class indices, not hashes or codes")
        return arr.astype(np.int64)
    return arr.astype(np.float32)


def load_query_teacher(spec: str, cwd: str | None = None) -> QueryTeacher:
    """A callable ('file.py:fn', 'package.module:fn') or command ('cmd:CMD ARGS') teacher."""
    if is_command_spec(spec):
        argv = _argv(spec)
        exe = _executable(argv[0], cwd)
        return QueryTeacher(exe, "command", spec=spec, argv=argv, cwd=cwd)
    fn = load_callable(spec, "--teacher")
    file = _callable_file(spec)
    if file is None:
        import inspect

        try:
            file = Path(inspect.getfile(fn))
        except (TypeError, OSError):
            file = Path(spec)
    return QueryTeacher(file, "callable", spec=spec, fn=fn)
