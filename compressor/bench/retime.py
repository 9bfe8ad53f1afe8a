"""Re-time a baseline's models beside the current ones, on this machine, in one process (asv `continuous`, pyperf
`compare_to` on side-by-side runs): per-run latencies do not survive a change of CPU, so the gate times both sides here.

A *side* is where a report's models come from: a run directory, a baseline bundle (`compress gate --update-baseline`
into a folder: report.json, the model files that load without running code, one latency sample, and a checksummed
marker), or a bare report.json (no files: nothing to re-time). Only ONNX, TorchScript and torch.export files are timed;
a state dict would need its code, which the gate never runs.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CompressError

MARKER = "gate-baseline.json"
MARKER_KIND = "compress-gate-baseline"
SAMPLE = "latency_sample.npy"  # the batch compress bench times (x_test[:batch_size]), written beside report.json
TEACHER_MAX_BYTES = 32 << 20  # a larger teacher stays out of a baseline bundle (its latency check then says so)
SAMPLE_MAX_BYTES = 64 << 20
BLACK_BOX = ("callable", "command")
log = logging.getLogger("compressor")


@dataclass
class Side:
    """A report and where its model files live (None for a bare report)."""

    report: dict
    report_path: Path
    root: Path | None = None  # folder the rows' timing files are relative to
    kind: str = "report"  # run | bundle | report
    files: dict = field(default_factory=dict)  # bundle: file name -> sha256 (the only files it may name)
    sample: np.ndarray | None = None

    def describe(self) -> str:
        return {"run": "run directory", "bundle": "baseline bundle", "report": "bare report"}[self.kind] + f" {self.root or self.report_path}"


def timing_file(row: dict) -> str | None:
    """The file that re-times a report row, relative to its side's root, or None when there is none."""
    if row.get("timing_file"):
        return row["timing_file"]
    if row.get("latency_measured_on", "host") != "host" or row["format"] in BLACK_BOX:
        return None
    if row["format"] == "onnx" or row["role"] == "teacher":
        return row["path"]
    return None  # a PyTorch student or baseline saved as a state dict: its code is not run here


def load_sample(path: Path) -> np.ndarray:
    try:
        if not path.is_file():  # a FIFO would block np.load forever, a device would never end
            raise CompressError(f"{path} is not a regular file; a latency sample is an .npy file")
        if path.stat().st_size > SAMPLE_MAX_BYTES:
            raise CompressError(f"{path} is larger than {SAMPLE_MAX_BYTES >> 20} MB; a latency sample is one batch")
        x = np.load(path, allow_pickle=False)
    except CompressError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise CompressError(f"{path} is not a readable latency sample (.npy): {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu" or x.ndim < 1 or x.shape[0] < 1:
        raise CompressError(f"{path} holds {getattr(x, 'dtype', type(x).__name__)} of shape {getattr(x, 'shape', '?')}, not a batch of model inputs")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise CompressError(f"{path} holds NaN or infinite values; a latency sample must be finite")
    return np.ascontiguousarray(x)


def open_side(path: str | Path, what: str) -> Side:
    """The report behind `path` (a run directory, a baseline bundle, or a report.json) and its files."""
    from .report import load_report

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    rep_path = p / "report.json" if p.is_dir() else p
    if not rep_path.is_file():
        raise CompressError(f"{what} {rep_path} does not exist" + ("" if rep_path.parent.exists() else " (nor does its folder)"),
                            hint="pass a report.json written by 'compress bench', its run directory, or a baseline bundle")
    rep = load_report(rep_path)
    if (folder / MARKER).is_file() and rep_path.parent == folder:
        side = Side(rep, rep_path, folder, "bundle", files=_read_marker(folder))
        if SAMPLE in side.files:
            side.sample = load_sample(folder / SAMPLE)
        return side
    if (folder / "manifest.json").is_file() and rep_path.parent == folder:
        side = Side(rep, rep_path, folder, "run")
        if (folder / SAMPLE).is_file():
            side.sample = load_sample(folder / SAMPLE)
        return side
    return Side(rep, rep_path)


def _read_marker(folder: Path) -> dict:
    """The bundle's file list, after checking every listed file against its checksum."""
    from .._io import sha256_file

    from .._io import read_regular_file

    mpath = folder / MARKER
    raw = read_regular_file(mpath, "baseline marker", 1 << 20)  # never a FIFO (would hang) or a device
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CompressError(f"{mpath} is not a readable baseline marker: {str(exc)[:200]}") from None
    if not (isinstance(m, dict) and m.get("kind") == MARKER_KIND and m.get("version") == 1 and isinstance(m.get("files"), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in m["files"].items())):
        raise CompressError(f"{mpath} is not a baseline marker of this tool (kind {MARKER_KIND}, version 1, files)")
    for name, digest in m["files"].items():
        if not _plain_name(name):
            raise CompressError(f"{mpath} lists '{name}', which is not a plain file name inside the bundle")
        f = folder / name
        if not f.is_file():
            raise CompressError(f"baseline bundle {folder} lacks {name}, which its marker lists", hint="restore it, or write the baseline again with --update-baseline")
        if sha256_file(f) != digest:
            raise CompressError(f"baseline bundle file {f} does not match its checksum in {MARKER}",
                                hint="it was changed or damaged; restore it, or write the baseline again with --update-baseline")
    return m["files"]


def _plain_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}", name)) and name not in (".", "..")


def resolve(side: Side, row: dict) -> tuple[Path | None, str]:
    """(file, '') for a row this side can re-time, or (None, why not)."""
    if side.kind == "report":
        return None, "a bare report has no model files"
    if row.get("latency_measured_on", "host") != "host":
        return None, "measured on a device: re-time it there"
    if row["format"] in BLACK_BOX:
        return None, "a black-box teacher's latency is not the model's"
    rel = timing_file(row)
    if rel is None:
        return None, "saved as a state dict (its code is not run by the gate); re-bench the run with this version for a TorchScript copy"
    if side.kind == "bundle":
        if rel not in side.files:
            return None, f"the baseline bundle does not hold {rel}"
        return side.root / rel, ""
    if row["role"] == "teacher":  # a run's teacher lives outside it: the file its manifest recorded, if unchanged
        return _run_teacher(side)
    f = side.root / rel
    try:
        inside = f.resolve().is_relative_to(side.root.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside or not _plain_name(f.name):
        return None, f"{rel} is not a file inside the run directory"
    if not f.is_file():
        return None, f"{f} does not exist"
    return f, ""


def _run_teacher(side: Side) -> tuple[Path | None, str]:
    """The teacher file a run's manifest recorded, when it is still there with the same sha256."""
    from .._io import sha256_file

    from .._io import read_regular_file

    try:
        raw = read_regular_file(side.root / "manifest.json", "manifest", 64 << 20)  # never a FIFO (would hang) or a device
        rec = json.loads(raw.decode("utf-8"))["inputs"]["teacher"]
        path, digest = Path(rec["path"]), rec["sha256"]
    except (CompressError, ValueError, KeyError, TypeError, RecursionError):
        return None, "the run's manifest records no teacher file"
    if not isinstance(digest, str) or not path.is_file():
        return None, f"the run's teacher file {path} is not there"
    if sha256_file(path) != digest:
        return None, f"the run's teacher file {path} changed since the run"
    return path, ""


def make_runner(path: Path, row: dict, threads: int):
    """A runner for a model file that loads without running code: ONNX through ONNX Runtime, TorchScript or a
    torch.export program through torch. Teachers go through TeacherRunner (fixed-batch exports are padded as in bench)."""
    from ..models.teacher import load_teacher, sniff_format
    from ..runtime import OnnxRuntimeRunner, TeacherRunner, TorchRunner

    kind = sniff_format(path)
    if kind not in ("onnx", "torchscript", "torch.export"):
        raise CompressError(f"{path} is not an ONNX, TorchScript or torch.export file; the gate re-times only files that load without running code")
    if row["role"] == "teacher":
        return TeacherRunner(load_teacher(path, files_only=True), threads)
    if kind == "onnx":
        return OnnxRuntimeRunner(path, threads, _providers(row))
    return TorchRunner(load_teacher(path, files_only=True).module, threads)


def _providers(row: dict) -> list[str]:
    m = re.match(r"host gpu \((\w+)\)", row.get("device", ""))
    if m:
        import onnxruntime as ort

        if m.group(1) in ort.get_available_providers():
            return [m.group(1), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass
class Pair:
    """One baseline model and its current counterpart, each with its runner and input batch."""

    name: str
    base_runner: object
    base_x: np.ndarray
    cur_runner: object
    cur_x: np.ndarray
    base_samples: list = field(default_factory=list)
    cur_samples: list = field(default_factory=list)


def time_pairs(pairs: list[Pair], *, rounds: int = 7, duration_s: float = 0.2, warmup_ms: float = 100.0, block_s: float = 0.005) -> None:
    """Time every pair in `rounds` rounds. In each round the baseline model and the current one alternate in blocks of
    about `block_s` (the one that starts alternates too) for `duration_s` in all, so a burst of other work, a frequency
    change or a neighbour's cache traffic falls on both sides alike; each side's round value is the median of its calls.
    Fills each pair's base_samples / cur_samples (ms per call, one value a round)."""
    import time

    active = []
    try:
        for p in pairs:
            for r in (p.base_runner, p.cur_runner):
                r.activate()
                active.append(r)
        blocks = []
        for p in pairs:  # warm-up (first calls allocate, page in weights, pick kernels); it also sizes the blocks
            per_call = []
            for r, x in ((p.base_runner, p.base_x), (p.cur_runner, p.cur_x)):
                end, n = time.perf_counter() + warmup_ms / 1000, 0
                t0 = time.perf_counter()
                while n < 5 or time.perf_counter() < end:
                    r.infer(x)
                    n += 1
                per_call.append((time.perf_counter() - t0) / n)
            blocks.append(max(1, int(block_s / max(per_call))))
        bar = _bar(rounds * len(pairs))
        for k in range(rounds):
            for p, n in zip(pairs, blocks):
                sides = [(p.base_runner, p.base_x, []), (p.cur_runner, p.cur_x, [])]
                end, flip = time.perf_counter() + duration_s, k % 2
                while time.perf_counter() < end or min(len(sides[0][2]), len(sides[1][2])) < 10:
                    for r, x, acc in (sides if not flip else sides[::-1]):
                        for _ in range(n):
                            t0 = time.perf_counter()
                            r.infer(x)
                            acc.append(time.perf_counter() - t0)
                    flip ^= 1
                p.base_samples.append(1000.0 * float(np.median(sides[0][2])))
                p.cur_samples.append(1000.0 * float(np.median(sides[1][2])))
                bar(f"round {k + 1}/{rounds}")
        bar(None)
    finally:
        for r in reversed(active):
            r.deactivate()


def _bar(total: int):
    """A rich progress bar on a terminal (stderr); silent otherwise. Returns advance(label) / advance(None) to stop."""
    if not sys.stderr.isatty():
        return lambda label: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("[bold]gate: re-timing {task.fields[what]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)
    prog.start()
    task = prog.add_task("retime", total=total, what="")

    def advance(label):
        if label is None:
            prog.stop()
        else:
            prog.update(task, advance=1, what=label)
    return advance


def plan_pairs(base: Side, cur: Side, matches: list[tuple[dict, dict]]) -> tuple[list[Pair], dict]:
    """Runners for every (baseline row, current row) both sides can re-time; the reasons for the others by name."""
    pairs, why = [], {}
    for b, c in matches:
        fb, rb = resolve(base, b)
        fc, rc = resolve(cur, c)
        if fb is None or fc is None:
            why[b["name"]] = ("baseline: " + rb) if fb is None else ("current: " + rc)
            continue
        xb = base.sample if base.sample is not None else cur.sample
        xc = cur.sample if cur.sample is not None else base.sample
        if xb is None:
            why[b["name"]] = f"neither side has {SAMPLE} (re-bench the runs with this version)"
            continue
        threads, bs = c.get("threads") or 1, c.get("batch_size") or 1  # both sides run as the current run was benched
        for what, v in (("threads", threads), ("batch_size", bs)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096:
                raise CompressError(f"current report: '{c['name']}' has {what} {v!r}; expected an integer from 1 to 4096")
        try:
            rb_, rc_ = make_runner(fb, b, threads), make_runner(fc, c, threads)
            for r, x in ((rb_, _batch(xb, bs)), (rc_, _batch(xc, bs))):  # one call each now, so a model that cannot run is named here
                with r:
                    y = np.asarray(r.infer(x))
                if not np.isfinite(y.astype(np.float64, copy=False)).all():
                    raise CompressError(f"{fb if r is rb_ else fc} gives NaN or infinite outputs on the latency sample")
        except CompressError as exc:
            raise CompressError(f"cannot re-time '{b['name']}': {exc}") from None
        except Exception as exc:  # ONNX Runtime / torch refusing the file or the sample
            msg = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
            raise CompressError(f"cannot re-time '{b['name']}': {msg}",
                                hint="the model file is damaged, or the latency sample does not fit its input") from None
        pairs.append(Pair(b["name"], rb_, _batch(xb, bs), rc_, _batch(xc, bs)))
    return pairs, why


def _batch(x: np.ndarray, n: int) -> np.ndarray:
    """The first n rows of the sample, its rows repeated when it has fewer."""
    return np.ascontiguousarray(x[:n] if len(x) >= n else np.resize(x, (n,) + x.shape[1:]))


def _tool_name(name: str) -> bool:
    """A file name a baseline bundle of this tool writes."""
    return name in ("report.json", SAMPLE) or bool(re.fullmatch(r"[a-z0-9][a-z0-9.-]*\.(onnx|torchscript\.pt|pt2|pt)", name))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "model"


GATE_TOML = "gate.toml"


def check_bundle_target(out: Path) -> None:
    """Refuse a --update-baseline folder that holds a report.json the tool did not write as a baseline bundle
    (a run directory, or the user's own file): the bundle would overwrite it."""
    if out.exists() and not out.is_dir():
        raise CompressError(f"{out} exists and is not a folder", hint="give --baseline a new folder, or FILE.json for a bare report")
    if out.is_dir() and (out / "report.json").exists() and not (out / MARKER).is_file():
        raise CompressError(f"{out / 'report.json'} exists and was not written by the tool as a baseline bundle; the bundle would overwrite it",
                            hint="give --baseline a new or empty folder, or one that holds a baseline bundle")
    if out.is_dir() and not (out / MARKER).is_file():
        import os

        others = sorted({e.name for e in os.scandir(out)} - {GATE_TOML})  # the user's gate.toml may sit beside the bundle
        if others:
            raise CompressError(f"{out} holds files the tool did not write ({', '.join(others[:3])}{', …' if len(others) > 3 else ''}) and no "
                                f"baseline bundle; a bundle goes only into a new or empty folder (a {GATE_TOML} may be there) or an earlier bundle",
                                hint="give --baseline a new folder")


def write_bundle(cur: Side, out: Path) -> dict:
    """Write the current run as a baseline bundle in `out`: report.json, the model files that re-time without code,
    the latency sample, and the marker listing every file with its checksum. Files are written one by one, atomically;
    a file the tool did not write (not in the old marker, or changed since) is never overwritten or deleted."""
    import copy
    import shutil

    from ..version import __version__
    from .._io import atomic_path, ensure_dir, sha256_file, write_bytes, write_json
    from .host import host_fingerprint
    from ..run import now

    if cur.kind != "run":
        raise CompressError(f"a baseline bundle needs the current run's model files, but {cur.report_path} is not inside a run directory",
                            hint="pass the run directory as CURRENT, or keep a bare report with --baseline FILE.json")
    check_bundle_target(out)
    old = _read_marker(out) if (out / MARKER).is_file() else {}
    rep = copy.deepcopy(cur.report)
    plan: dict[str, Path] = {}  # bundle name -> source file
    for row in rep["models"]:
        f, why = resolve(cur, row)
        row.pop("timing_file", None)
        if f is None:
            continue
        if row["role"] == "teacher" and f.stat().st_size > TEACHER_MAX_BYTES:
            log.info(f"gate: the teacher ({f.stat().st_size >> 20} MB) stays out of the baseline bundle; its latency is not re-timed")
            continue
        from ..models.teacher import sniff_format

        name = _slug(row["name"]) + {"onnx": ".onnx", "torch.export": ".pt2", "torchscript": ".torchscript.pt"}.get(sniff_format(f), ".pt")
        plan[name] = f
        row["timing_file"] = name
    if cur.sample is not None:
        plan[SAMPLE] = cur.root / SAMPLE
    targets = list(plan) + ["report.json"]
    for name in targets + [MARKER]:
        f = out / name
        if f.exists() and name != MARKER and name not in old:
            raise CompressError(f"{f} exists and was not written by the tool; the baseline bundle would overwrite it",
                                hint="give --baseline a new or empty folder, or one that holds a baseline bundle")
    ensure_dir(out)
    files = {}
    for name, src in plan.items():
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src, tmp)
        files[name] = sha256_file(out / name)
    write_json(out / "report.json", rep)
    files["report.json"] = sha256_file(out / "report.json")
    for name in set(old) - set(files):  # the previous bundle's files this one no longer has: checksum-checked, and only
        if _tool_name(name):            # names the tool writes (a marker edited to list gate.toml deletes nothing)
            (out / name).unlink(missing_ok=True)
    marker = {"kind": MARKER_KIND, "version": 1, "tool_version": __version__, "created": now(), "source": str(cur.root),
              "host": host_fingerprint(rep), "files": files}
    write_bytes(out / MARKER, (json.dumps(marker, indent=2) + "\n").encode())
    return marker
