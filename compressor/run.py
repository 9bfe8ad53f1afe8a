"""The run directory and its manifest: inputs with their hashes, configs, and each stage's status,
so a stage can run alone, a finished stage is skipped, and an interrupted one can resume."""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import shlex
import sys
from pathlib import Path

from .version import __version__
from ._io import sha256_file, sha256_json, write_json
from .config import CompressConfig
from .errors import CompressError

MANIFEST = "manifest.json"
MANIFEST_MAX_BYTES = 64 << 20  # a manifest is kilobytes; stage results included, far below this
STAGES = ("distill", "export", "quantize", "bench", "report")
DEMO_TEACHER = Path(__file__).parent / "assets" / "demo_teacher.pt"
# code-free files the distill stage saves for later stages (fixed names inside the run: see Run.teacher)
COPY_SUFFIX = ".jit.pt"  # student.jit.pt, baseline.jit.pt: TorchScript copies of the trained modules
TEACHER_COPY = "teacher.jit.pt"  # a TorchScript copy of a teacher that came as code (state dict + --teacher-arch, --trust pickle)
TEACHER_HELDOUT = "teacher_heldout.npz"  # the teacher's class for each held-out row
TRUST_LATER_HINT = ("later stages do not run code a run folder names: rerun distill to save code-free copies, or pass --trust "
                    "to this command to run that code (only for a run folder you trust)")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def default_run_dir() -> Path:
    """runs/<timestamp>, with a -2, -3, ... suffix when a run started in the same second already took the name."""
    base = Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists() or path.is_symlink():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


_HASHES: dict = {}  # (path, inode, size, mtime) -> sha256: a file is read once per process, however many stages check it


def hash_file(path: str | Path) -> str:
    """sha256 of a file, remembered for as long as the file's inode, size and modification time stay the same."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _data_fingerprint(source: str) -> str:
    from .data.shards import is_shard_spec, shard_fingerprint

    if is_shard_spec(source):  # the shards' names, sizes and modification times (a pattern naming a missing shard: its text)
        try:
            return sha256_json(shard_fingerprint(source))
        except CompressError:
            return sha256_json(source)
    p = Path(source)
    if source == "mnist1d" or not p.exists():
        return sha256_json(source)
    if p.is_file():
        return hash_file(p)
    files = sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file())
    return sha256_json(files)


# what later stages read from a finished stage's result: checked when a manifest is read, not met as a KeyError later
_DONE_RESULT = {"distill": (("student_record", dict), ("num_classes", int), ("params", int)), "quantize": (("recipe", str),)}


def _manifest_problem(m) -> str | None:
    """What makes a parsed manifest unfit for the stages (None when it is fit): its top level, its config, its inputs,
    then each stage record."""
    for check in (_top_problem, _config_problem, _inputs_problem):
        why = check(m)
        if why:
            return why
    for name, st in m["stages"].items():
        why = _stage_problem(name, st)
        if why:
            return why
    return None


def _top_problem(m) -> str | None:
    if not isinstance(m, dict) or m.get("manifest_version") != 1:
        return "no manifest_version 1"
    for key, kind in (("config", dict), ("stages", dict), ("inputs", dict), ("created", str)):
        if not isinstance(m.get(key), kind):
            return f"'{key}' is {type(m.get(key)).__name__ if key in m else 'missing'}, not {kind.__name__}"
    return None


def _config_problem(m) -> str | None:
    missing = [k for k in ("target", "teacher_arch", "data", "distill") if k not in m["config"]]
    if missing:
        return f"config lacks {', '.join(missing)}"
    try:
        CompressConfig.from_dict(m["config"])
    except CompressError as exc:
        return exc.message
    except RecursionError:
        return "config nested too deeply"
    return None


def _inputs_problem(m) -> str | None:
    teacher = m["inputs"].get("teacher")
    if not (isinstance(teacher, dict) and isinstance(teacher.get("sha256"), str) and isinstance(teacher.get("path"), str)
            and isinstance(teacher.get("cwd", ""), (str, type(None))) and isinstance(m["inputs"].get("data"), dict)):
        return "'inputs' lacks the teacher's path and sha256 or the data"
    return None


def _stage_problem(name: str, st) -> str | None:
    if not isinstance(st, dict):
        return f"stage '{name}' is {type(st).__name__}, not an object"
    for key, kind in (("status", str), ("fingerprint", str), ("outputs", dict), ("result", dict)):
        if key in st and not isinstance(st[key], kind):
            return f"stage '{name}': '{key}' is {type(st[key]).__name__}, not {kind.__name__}"
    if not all(isinstance(v, str) for v in st.get("outputs", {}).values()):
        return f"stage '{name}': 'outputs' must map names to relative paths"
    for v in st.get("outputs", {}).values():  # a run folder that travelled names files inside itself only
        if not v or Path(v).is_absolute() or ".." in Path(v).parts or "\0" in v:
            return f"stage '{name}': output {v!r:.80} is not a path inside the run folder"
    if st.get("status") == "done":
        for key, kind in _DONE_RESULT.get(name, ()):
            got = st.get("result", {}).get(key)
            if not isinstance(got, kind) or isinstance(got, bool):
                return f"stage '{name}' is done but its result's '{key}' is {type(got).__name__ if got is not None else 'missing'}"
    return None


class Run:
    """A run directory: manifest.json plus every artifact, addressed by paths relative to it."""

    def __init__(self, path: Path, manifest: dict):
        self.dir, self.manifest = path, manifest
        self.computed: dict = {}  # values a stage computed that a later one in the same process reuses (never saved as such)

    # -- creation and loading -------------------------------------------------------------
    @classmethod
    def create(cls, path: Path | None, cfg: CompressConfig) -> "Run":
        """Open or start the run directory for a full configuration (a new, empty or run folder only: see ownership)."""
        from .ownership import claim_run_dir

        from .data.shards import is_shard_spec

        path = claim_run_dir(path or default_run_dir(), (cfg.data.source, cfg.data.eval_source, *(cfg.data.unlabeled or [])))
        if cfg.teacher is None:
            if cfg.data.source != "mnist1d":
                raise CompressError("--data needs --teacher", hint="the built-in demo teacher only fits the built-in 'mnist1d' data")
            cfg.teacher = str(DEMO_TEACHER)
        from .models.query_teacher import is_query_spec, query_spec_input

        if is_query_spec(cfg.teacher):  # a callable or a command: a black box that can only be queried
            teacher_input, cfg.teacher = query_spec_input(cfg.teacher)
        else:
            teacher = Path(cfg.teacher)
            if not teacher.is_file():
                raise CompressError(f"teacher {teacher} does not exist" if not teacher.exists() else f"teacher {teacher} is not a file")
            teacher_input = {"path": str(teacher.resolve()), "sha256": hash_file(teacher)}
            cfg.teacher = str(teacher.resolve())
        for attr in ("source", "eval_source"):  # absolute: a later stage run from another folder reads the same files
            v = getattr(cfg.data, attr)
            if v and v != "mnist1d" and Path(v).exists():
                setattr(cfg.data, attr, str(Path(v).resolve()))
            elif v and is_shard_spec(v) and Path(v).parent.is_dir():  # a shard pattern: its folder made absolute
                setattr(cfg.data, attr, str(Path(v).parent.resolve() / Path(v).name))
        inputs = {
            "teacher": teacher_input,
            "data": {"source": cfg.data.source, "fingerprint": _data_fingerprint(cfg.data.source)},
        }
        if cfg.data.unlabeled:
            cfg.data.unlabeled = [str(Path(u).resolve()) if Path(u).exists() else u for u in cfg.data.unlabeled]
            inputs["unlabeled"] = [{"source": u, "fingerprint": _data_fingerprint(u)} for u in cfg.data.unlabeled]
        if cfg.data.eval_source:
            inputs["eval_data"] = {"source": cfg.data.eval_source, "fingerprint": _data_fingerprint(cfg.data.eval_source)}
        old = cls._read(path) if (path / MANIFEST).exists() else None
        manifest = {
            "manifest_version": 1, "tool_version": __version__,
            "created": old["created"] if old else now(), "updated": now(),
            "command": sys.argv[:], "config": cfg.to_dict(), "inputs": inputs,
            "stages": old["stages"] if old else {},
        }
        run = cls(path, manifest)
        run.save()
        return run

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """An existing run directory, as written by an earlier stage."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise CompressError(f"{path} is not a run directory (no {MANIFEST})", hint="run 'compress distill' or 'compress' with --out first")
        from .ownership import check_no_links_out

        check_no_links_out(path)  # a run folder that travelled must not steer our writes into folders elsewhere
        return cls(path, cls._read(path))

    @staticmethod
    def _read(path: Path) -> dict:
        """The manifest, checked for the shape every stage relies on: a damaged or foreign file is exit 2 here,
        never a KeyError or TypeError deep inside a stage."""
        from ._io import read_regular_file

        mpath, hint = path / MANIFEST, "start a fresh run with another --out"

        def refuse(why: str) -> CompressError:
            return CompressError(f"{mpath} is unreadable or not a manifest of this tool: {why}", hint=hint)

        raw = read_regular_file(mpath, "manifest", MANIFEST_MAX_BYTES, hint=hint)  # never a FIFO, a device or a huge file
        try:
            m = json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise refuse("nested too deeply") from None
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise refuse(f"not JSON ({str(exc)[:100]})") from None
        why = _manifest_problem(m)
        if why:
            raise refuse(why)
        return m

    def save(self) -> None:
        self.manifest["updated"] = now()
        write_json(self.dir / MANIFEST, self.manifest)

    # -- configuration and inputs ------------------------------------------------------------
    @functools.cached_property
    def config(self) -> CompressConfig:
        return CompressConfig.from_dict(self.manifest["config"])

    def set_stage_config(self, stage: str, stage_cfg) -> None:
        self.manifest["config"][stage] = stage_cfg.to_dict()
        self.__dict__.pop("config", None)

    def path(self, rel: str) -> Path:
        return self.dir / rel

    @functools.cached_property
    def target(self) -> dict:
        from .targets import get_target

        return get_target(self.config.target)

    # -- what a stage may load: a run folder is data -------------------------------------------------
    # The distill stage got the teacher and the student from its own command line (`live`): it may run their code
    # (a --teacher-arch, a --trust pickle, a black box, a student factory), and it saves what later stages need in
    # forms that load without running Python code (distill/code_free.py): TorchScript copies of the trained modules
    # and of a teacher that came as code, the teacher's held-out answers, the teacher's input shape. A later stage
    # loads those; it runs code the manifest names only when its own command line says --trust (`trust`), and a
    # black-box teacher (a callable or a command) never.
    live = False
    trust = False

    @functools.cached_property
    def teacher(self):
        """The teacher: as the command line named it in the distill stage; in a later stage, only from files that
        load without running code (the file itself when it is TorchScript, torch.export or ONNX, else its copy)."""
        from .models import load_teacher
        from .models.query_teacher import is_query_spec

        cfg = self.config
        recorded = self.manifest["inputs"]["teacher"]
        query = is_query_spec(cfg.teacher)
        self._check_teacher_unchanged()
        if self.live:
            return load_teacher(cfg.teacher, cfg.teacher_arch, cfg.trust, cwd=recorded.get("cwd"))
        copy = self._code_free("teacher_torchscript", TEACHER_COPY)
        if copy is not None:
            return load_teacher(copy, files_only=True)
        if query:
            raise CompressError(f"this run's teacher is a black box ({cfg.teacher[:120]}) and later stages never run what a run folder names",
                                hint="its held-out answers recorded by the distill stage stand in for it; rerun distill to record them")
        from .models.teacher import sniff_format

        if Path(cfg.teacher).is_file() and sniff_format(Path(cfg.teacher)) == "torch.save":  # a state dict or a pickle: code
            if not self.trust:
                raise CompressError(f"this run's teacher {Path(cfg.teacher).name} needs code to load (a --teacher-arch or a pickled module) "
                                    f"and the run has no code-free copy of it ({TEACHER_COPY})", hint=TRUST_LATER_HINT)
            return load_teacher(cfg.teacher, cfg.teacher_arch, True)
        return load_teacher(cfg.teacher, files_only=True)

    def end_live(self) -> None:
        """After the distill stage, in the same process (compress): the later stages read the run as a later command
        would, from its code-free copies. What distill loaded stays loaded where that is the same thing: the data,
        and a teacher that is a file loading without code (TorchScript, torch.export, ONNX); a teacher that came as
        code is reloaded from its TorchScript copy, and a black box is never asked again."""
        self.live = False
        teacher = self.__dict__.get("teacher")
        if teacher is not None and (teacher.format in ("state_dict", "pickle") or hasattr(teacher, "answers")
                                    or self._code_free("teacher_torchscript", TEACHER_COPY) is not None):
            del self.__dict__["teacher"]

    def _check_teacher_unchanged(self) -> None:
        """The teacher the run was made with is still the same where it still is (hashes files; runs nothing)."""
        from .models.query_teacher import is_query_spec, query_spec_input

        cfg, recorded = self.config, self.manifest["inputs"]["teacher"]
        if is_query_spec(cfg.teacher):  # the callable's file, or the command line and its file arguments
            changed = query_spec_input(cfg.teacher, recorded.get("cwd"))[0]["sha256"] != recorded["sha256"]
        else:
            changed = Path(cfg.teacher).is_file() and hash_file(cfg.teacher) != recorded["sha256"]
        if changed:
            raise CompressError(f"teacher {cfg.teacher} changed since this run started", hint="rerun the whole pipeline, or use a new --out")

    @property
    def teacher_input_shape(self):
        """The teacher's declared input shape: recorded by the distill stage, so later stages need not load the teacher."""
        res = (self.manifest["stages"].get("distill") or {}).get("result") or {}
        if not self.live and "teacher_input_shape" in res:
            self._check_teacher_unchanged()
            shape = res["teacher_input_shape"]
            return tuple(shape) if isinstance(shape, list) else None
        from .models.query_teacher import is_query_spec

        if not self.live and is_query_spec(self.config.teacher):  # a run from before the shape was recorded
            return None
        return self.teacher.input_shape

    @functools.cached_property
    def data(self):
        from .data import load_data
        from .data.shards import is_shard_spec

        cfg = self.config.data
        recorded_unlabeled = self.manifest["inputs"].get("unlabeled") or []
        sources = [("data", cfg.source, self.manifest["inputs"].get("data")), ("eval_data", cfg.eval_source, self.manifest["inputs"].get("eval_data"))]
        sources += [("unlabeled", u, r) for u, r in zip(cfg.unlabeled or [], recorded_unlabeled)]
        for key, src, recorded in sources:  # the same rows the run was made from, or an error
            if self.live:  # Run.create fingerprinted them moments ago, in this process
                break
            if isinstance(recorded, dict) and src and recorded.get("fingerprint") != _data_fingerprint(src):
                gone = src != "mnist1d" and not Path(src).exists() and not is_shard_spec(src)
                raise CompressError(f"data {src} {'no longer exists' if gone else 'changed since this run started'}",
                                    hint="rerun the whole pipeline (compress … --force), or use a new --out")
        return load_data(self.config.data, teacher_input_shape=self.teacher_input_shape, cache_dir=self.dir / "cache")

    def load_trained(self, name: str, *, eager: bool = False):
        """The trained student (or baseline) saved by the distill stage, in eval mode: rebuilt from its spec when that
        is built in (or in the distill stage itself), else its TorchScript copy; eager=True (an nn.Module to modify)
        rebuilds it from its code, which a later stage does only with --trust."""
        import torch

        st = self.stage("distill")
        res = st.get("result") or {}
        record, num_classes = res.get("student_record"), res.get("num_classes")
        if not (isinstance(record, dict) and isinstance(record.get("spec"), str) and isinstance(record.get("kwargs", {}), dict)
                and isinstance(num_classes, int) and num_classes >= 1):
            raise CompressError(f"{self.dir / MANIFEST}: the distill stage's record of the {name} is damaged (student_record, num_classes)",
                                hint="rerun distill with --force, or start a fresh run with another --out")
        spec = record["spec"]
        if self.live or spec.startswith("builtin:"):
            return self.rebuild_trained(name, record, num_classes)
        copy = None if eager else self._code_free(f"{name}_torchscript", f"{name}{COPY_SUFFIX}")
        if copy is not None:
            try:
                return torch.jit.load(str(copy), map_location="cpu").eval()
            except Exception as exc:
                raise CompressError(f"{copy} cannot be loaded: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}",
                                    hint="the file may be truncated; rerun distill") from None
        if not self.trust:
            why = "this step needs it as an eager module, rebuilt from that code" if eager else f"the run has no code-free copy of it ({name}{COPY_SUFFIX})"
            raise CompressError(f"this run's {name} was built by code ({spec[:120]}) and {why}", hint=TRUST_LATER_HINT)
        return self.rebuild_trained(name, record, num_classes)

    def rebuild_trained(self, name: str, record: dict, num_classes: int):
        """Build the module from its record (running a factory's code) and load its state dict."""
        import torch

        from .models import load_student

        # a student cut from the teacher ('teacher:every-other') is rebuilt from the same (hash-checked) eager teacher
        teacher = None
        if str(record.get("spec", "")).startswith("teacher:"):
            teacher = self.teacher if self.live else self._eager_teacher()
        module = load_student(record, input_shape=self.data.input_shape, num_classes=num_classes, teacher=teacher)
        module.load_state_dict(torch.load(self.path(f"{name}.pt"), map_location="cpu", weights_only=True))
        return module.eval()

    def _eager_teacher(self):
        """The teacher rebuilt from what the config names (only with --trust in a later stage; never a black box)."""
        from .models import load_teacher
        from .models.query_teacher import is_query_spec

        self.teacher  # the hash check, and the refusals a later stage makes
        if is_query_spec(self.config.teacher):
            raise CompressError("a black-box teacher has no module to cut a student from")
        return load_teacher(self.config.teacher, self.config.teacher_arch, self.live and self.config.trust or self.trust)

    def _code_free(self, key: str, filename: str) -> Path | None:
        """A code-free copy the distill stage recorded under `key`: always the fixed name inside the run, never a
        path taken from the manifest."""
        st = self.manifest["stages"].get("distill") or {}
        p = self.path(filename)
        return p if (st.get("outputs") or {}).get(key) == filename and p.is_file() else None

    def teacher_heldout_pred(self):
        """The teacher's class for each held-out row, recorded by the distill stage; None when it is not there or does
        not fit the data's held-out rows."""
        import numpy as np

        p = self._code_free("teacher_heldout", TEACHER_HELDOUT)
        if p is None:
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                pred = np.asarray(z["pred"]) if "pred" in z.files else None
        except Exception:  # damaged (a bad zip, a truncated array): as if it were not there
            return None
        if pred is None or pred.ndim != 1 or pred.dtype.kind not in "iu" or len(pred) != len(self.data.y_test):
            return None
        return pred.astype(np.int64)

    def blackbox_teacher_row(self) -> dict | None:
        """A black-box teacher's bench row as the distill stage measured it (it is never queried again), or None."""
        res = (self.manifest["stages"].get("distill") or {}).get("result") or {}
        row = res.get("teacher_row")
        return dict(row) if isinstance(row, dict) and self.teacher_heldout_pred() is not None else None

    def check_data_fits_teacher(self, teacher_logits_sample) -> None:
        from .data import check_classes

        check_classes(self.data, teacher_logits_sample.shape[1])

    # -- stage bookkeeping -----------------------------------------------------------------------
    def fingerprint(self, stage: str) -> str:
        """What a stage's outputs depend on: its config, the inputs, and the stages before it."""
        cfg = self.manifest["config"]
        parts = {"stage": stage, "inputs": self.manifest["inputs"], "target": cfg["target"]}
        for s in STAGES[: STAGES.index(stage) + 1]:
            parts[s] = cfg.get(s, {}) if s != "distill" else {"distill": cfg["distill"], "data": cfg["data"], "teacher_arch": cfg["teacher_arch"]}
        return sha256_json(parts)

    def is_done(self, stage: str) -> bool:
        st = self.manifest["stages"].get(stage)
        return bool(st and st.get("status") == "done" and st.get("fingerprint") == self.fingerprint(stage)
                    and all(self.path(p).exists() for p in st.get("outputs", {}).values()))

    def stage(self, stage: str) -> dict:
        st = self.manifest["stages"].get(stage)
        if not st or st.get("status") != "done":
            raise CompressError(f"stage '{stage}' has not finished in {self.dir}", hint=f"run 'compress {stage} {shlex.quote(str(self.dir))}' first")
        return st

    def begin(self, stage: str) -> None:
        self.remove_stale_temporaries()
        self.manifest["stages"][stage] = {"status": "running", "started": now(), "fingerprint": self.fingerprint(stage)}
        # a stage that reruns makes every later stage stale
        for later in STAGES[STAGES.index(stage) + 1:]:
            if later in self.manifest["stages"]:
                self.manifest["stages"][later]["status"] = "stale"
        self.save()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete half-written files and scratch folders left by a process of ours that was killed (SIGKILL, power
        loss) before it could rename or remove them: only the tool's own temporary names, in the run's own folders."""
        from .distill.ddp import in_torchrun
        from .ownership import sweep_stale

        if in_torchrun():  # a worker's sweep would delete the temporaries another rank is writing: the launcher swept
            return []
        return sweep_stale(self.dir)

    @contextlib.contextmanager
    def running(self, stage: str):
        """Mark a stage running; on an error or an interrupt record it as failed/interrupted, then re-raise."""
        self.begin(stage)
        try:
            yield
        except KeyboardInterrupt:
            self.fail(stage, "interrupted", "interrupted by the user")
            raise
        except CompressError as exc:
            self.fail(stage, "failed", str(exc))
            raise

    def finish(self, stage: str, outputs: dict, result: dict) -> None:
        st = self.manifest["stages"][stage]
        st.update(status="done", finished=now(), outputs=outputs, result=result)
        self.save()

    def fail(self, stage: str, status: str, message: str) -> None:
        st = self.manifest["stages"].setdefault(stage, {})
        st.update(status=status, finished=now(), error=message)
        self.save()


# --- what every stage does first ------------------------------------------------------------------------------------------
def skip_done(run: Run, stage: str, force: bool) -> bool:
    """True (and says so) when the stage is done with the same inputs and settings and --force is not given."""
    if not force and run.is_done(stage):
        from .log import say

        say(f"{stage}: already done in {run.dir} (use --force to redo)")
        return True
    return False


def open_stage(run: "Run | str | Path", stage: str, config=None, trust: bool = False) -> Run:
    """The run for one stage, with the stage's (optionally changed) config: a run already open in this process (compress
    hands its Run from stage to stage, so the teacher and the data load once) or a run folder, opened here.
    trust: the stage may run code the run folder names when it has no code-free copy of it (Run.trust)."""
    if not isinstance(run, Run):
        run = Run.open(run)
    run.trust = run.trust or trust
    if config is not None:
        run.set_stage_config(stage, config)
    return run
