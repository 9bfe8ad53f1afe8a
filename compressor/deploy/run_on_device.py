#!/usr/bin/env python3
"""Run this bundle's student on the device and write report.json in compressor's report contract.

Needs numpy, tensorrt and cuda-python (or a CUDA build of torch); not compressor. It first checks every file against
SHA256SUMS and manifest.json with the standard library alone, then imports latency.py and trt_core.py from the bytes
it checked; it loads the engines build_engine.sh made (or builds them with TensorRT's Python API), measures accuracy
on the bundled held-out rows and batch-1 latency with latency.py (compressor's own methodology, shipped verbatim),
and writes report.json. Back on the host: compress report RUN_DIR --merge report.json

    python3 run_on_device.py                          # TensorRT engines on this device's GPU
    python3 run_on_device.py --runtime onnxruntime    # the ONNX files through ONNX Runtime on the CPU (no GPU needed)
"""
from __future__ import annotations

import os
import sys

# The bundle folder is data until its checksums have been checked: take it off the import path (Python puts the
# script's folder first) so that no file in it, listed or not, can stand in for a module imported below.
_FOLDER = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _FOLDER]

import argparse  # noqa: E402  (standard library only until check_bundle() has passed)
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(_FOLDER)
MODULES = ("latency.py", "trt_core.py")  # compressor/bench/latency.py and compressor/runtime/trt_core.py, verbatim
COPY_AGAIN = "copy the bundle again (or unpack its .tar.gz afresh)"
np = latency = trt_core = None  # set by load_checked(), once every file has matched its checksum


class Failure(Exception):
    def __init__(self, message: str, hint: str = "", code: int = 2):
        super().__init__(message)
        self.message, self.hint, self.code = message, hint, code


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_bundle() -> tuple[dict, dict[str, bytes]]:
    """Every file against SHA256SUMS and manifest.json before anything in the bundle is read as data or run as code.
    Returns the manifest and the checked bytes of MODULES (imported from those same bytes, not read again)."""
    try:
        sums_text = (HERE / "SHA256SUMS").read_text(encoding="utf-8")
        raw = (HERE / "manifest.json").read_bytes()
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(f"cannot read the bundle's checksums: {exc}", COPY_AGAIN) from None
    sums = {}
    for line in sums_text.splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise Failure(f"SHA256SUMS has a line that is no checksum: {line[:80]!r}", COPY_AGAIN)
        sums[name] = digest
    if hashlib.sha256(raw).hexdigest() != sums.get("manifest.json"):
        raise Failure("manifest.json does not match its checksum in SHA256SUMS", COPY_AGAIN)
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        listed = {rel: (info["sha256"], info["size_bytes"]) for rel, info in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Failure(f"manifest.json is not a bundle manifest ({exc!r})", COPY_AGAIN) from None
    bad = [f"{m} is not listed in manifest.json" for m in MODULES if m not in listed]
    bad += [f"{rel} is listed in SHA256SUMS but not in manifest.json" for rel in sums if rel not in listed and rel != "manifest.json"]
    sources = {}
    for rel, (digest, size) in listed.items():
        p = HERE / rel
        if not isinstance(rel, str) or rel != p.name or rel in ("", ".", ".."):
            bad.append(f"manifest.json lists {rel!r}, which is not a file name in the bundle")
        elif sums.get(rel) != digest:
            bad.append(f"{rel} has another checksum in manifest.json than in SHA256SUMS")
        elif not p.is_file():
            bad.append(f"{rel} is missing")
        elif rel in MODULES:
            data = p.read_bytes()
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                bad.append(f"{rel} does not match its checksum")
            sources[rel] = data
        elif p.stat().st_size != size or sha256(p) != digest:
            bad.append(f"{rel} does not match its checksum")
    if bad:
        raise Failure("; ".join(bad), COPY_AGAIN)
    return manifest, sources


def load_checked(sources: dict[str, bytes]) -> None:
    """Import numpy, then latency.py and trt_core.py from the bytes check_bundle() has just checked."""
    global np, latency, trt_core
    try:
        import numpy
    except ImportError:
        raise Failure("numpy is not installed", "pip install numpy") from None
    np = numpy
    mods = {}
    for rel in MODULES:
        name = rel.removesuffix(".py")
        mod = types.ModuleType(name)
        mod.__file__ = str(HERE / rel)
        sys.modules[name] = mod  # before exec: dataclasses and the like look their module up there
        exec(compile(sources[rel], mod.__file__, "exec"), mod.__dict__)
        mods[name] = mod
    latency, trt_core = mods["latency"], mods["trt_core"]


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file beside `path`, fsync, rename: never a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def describe_device(gpu: str | None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and val.strip():
                    cpu = val.strip()
                    break
    except OSError:
        pass
    try:  # a Jetson names itself here ("NVIDIA Jetson Orin Nano Developer Kit")
        board = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
    except OSError:
        board = None
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load = None
    pkgs = ("numpy", "tensorrt", "cuda-python", "torch", "onnxruntime", "onnxruntime-gpu")
    return {"hostname": platform.node(), "load_average_1m": load, "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "cpu_features": [], "gpu": gpu, "board": board, "python": platform.python_version(),
            "versions": {p: v for p in pkgs if (v := _version(p))}}


# --- runners: the same activate / infer / deactivate shape as compressor's ----------------------------------
class OrtRunner:
    runtime, format = "onnxruntime", "onnx"

    def __init__(self, onnx_file: Path, threads: int):
        self.path, self.threads = onnx_file, threads

    def __enter__(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise Failure("onnxruntime is not installed", "pip install onnxruntime, or run without --runtime onnxruntime") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = self.threads, 1, 3
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        return self

    def infer(self, x):
        return self.session.run(None, {self.input_name: x})[0]

    def __exit__(self, *exc):
        self.session = None


class TrtRunner:
    runtime, format = "tensorrt", "tensorrt"

    def __init__(self, engine: dict, batch: dict, rebuild: bool):
        self.spec, self.batch, self.rebuild = engine, batch, rebuild
        self.path = HERE / engine["engine"]
        self.built = None

    def __enter__(self):
        if self.rebuild or not self.path.is_file():
            print(f"building {self.path.name} from {self.spec['onnx']} ({self.spec['precision']}) ...", file=sys.stderr)
            data, plan = trt_core.build_serialized(HERE / self.spec["onnx"], self.spec["precision"], self.spec["graph"],
                                                   batch=(self.batch["min"], self.batch["opt"], self.batch["max"]))
            write_atomic(self.path, data)
            self.built = plan
        self.inner = trt_core.EngineRunner(self.path).activate()
        return self

    def infer(self, x):
        return self.inner.infer(x)

    @property
    def gpu_times_ms(self):
        return self.inner.gpu_times_ms

    def __exit__(self, *exc):
        self.info = self.inner.describe()
        self.inner.deactivate()


def infer_all(runner, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(runner.infer(np.ascontiguousarray(x[i:i + batch])), np.float32) for i in range(0, len(x), batch)])


def run(args, manifest: dict) -> dict:
    with np.load(HERE / manifest["heldout"]["file"], allow_pickle=False) as npz:
        x, y, teacher_pred = npz["x"], npz["y"], npz["teacher_pred"]
    bench = dict(manifest["bench"])
    for key in ("warmup_ms", "min_runs", "min_duration_s"):
        if getattr(args, key) is not None:
            bench[key] = getattr(args, key)
    wanted = set(args.models.split(",")) if args.models else None
    batch, gpu, rows, notes = manifest["batch"], None, [], []
    for spec in manifest["engines"]:
        if wanted and spec["name"] not in wanted:
            continue
        onnx = manifest["onnx"][spec["onnx"]]
        if args.runtime == "onnxruntime":
            if spec["precision"] != spec["graph"]:
                continue  # an FP16 engine from the FP32 graph has no ONNX Runtime counterpart here
            runner, path = OrtRunner(HERE / spec["onnx"], bench["threads"]), spec["onnx"]
        else:
            runner, path = TrtRunner(spec, batch, args.rebuild), spec["engine"]
        with runner:
            logits = infer_all(runner, x, batch["max"])
            x1 = np.ascontiguousarray(x[: bench["batch_size"]])
            lat = latency.measure(lambda: runner.infer(x1), warmup_ms=bench["warmup_ms"], warmup_runs=bench["warmup_runs"],
                                  min_runs=bench["min_runs"], min_duration_s=bench["min_duration_s"])
        pred = logits.argmax(1)
        row = {"name": f"student {runner.format} {spec['precision']}", "role": "student", "format": runner.format,
               "precision": spec["precision"], "runtime": runner.runtime, "path": path, "size_bytes": (HERE / path).stat().st_size,
               "params": int(onnx["params"]), "accuracy": float(np.mean(pred == y)), "agreement": float(np.mean(pred == teacher_pred)),
               "latency_ms": lat, "batch_size": bench["batch_size"], "latency_measured_on": "target"}
        if isinstance(runner, TrtRunner):
            gpu = runner.info.get("gpu")
            row.update(device=f"target gpu ({gpu})", threads=1, gpu_latency_ms=trt_core.summarize_ms(runner.gpu_times_ms[-lat["runs"]:]),
                       engine={"tensorrt_version": runner.info["tensorrt_version"], "timer": runner.info["timer"],
                               "built_here": runner.built is not None, **({"plan": runner.built} if runner.built else {})})
        else:
            row.update(device=f"target cpu ({bench['threads']} thread{'s' if bench['threads'] != 1 else ''}, ONNX Runtime)", threads=bench["threads"])
        rows.append(row)
    if not rows:
        raise Failure("no model to run", f"--models takes names from: {', '.join(e['name'] for e in manifest['engines'])}")
    host = describe_device(gpu)
    t = manifest["target"]
    where = host.get("board") or host["cpu"]
    if args.runtime == "onnxruntime":
        note = (f"Latencies were measured on the device ({where}) with ONNX Runtime on its CPU (run_on_device.py --runtime onnxruntime), "
                f"not with TensorRT; accuracy is on the {len(y)} held-out rows shipped in the bundle.")
    else:
        note = (f"Latencies were measured on the device ({where}, GPU {gpu}) with TensorRT {rows[0]['engine']['tensorrt_version']}: "
                f"batch {bench['batch_size']}, host clock around each synchronous run, the same warm-up and run counts as the host bench "
                f"(latency.py); gpu_latency_ms is the GPU time alone from CUDA events. Accuracy is on the {len(y)} held-out rows shipped in the bundle.")
    notes.append(note)
    data = manifest["heldout"]["data"]
    return {
        "schema_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": manifest["versions"]["compressor"],
        "target": {"name": t["name"], "description": t["description"], "kind": t["kind"], "runtime": args.runtime,
                   "latency_measured_on": "target", "latency_note": note},
        "host": host,
        "data": {"name": data.get("name", ""), "train_labeled": data["train_labeled"], "train_unlabeled": data["train_unlabeled"],
                 "heldout": int(len(y)), "heldout_source": data["heldout_source"]},
        "configs": {"device": {"runtime": args.runtime, **bench, "heldout_rows": int(len(y)), "batch": batch}},
        "models": rows,
        "notes": notes,
        "bundle": {"name": manifest["bundle"], "created": manifest["created"], "run": manifest["run"],
                   "manifest_sha256": sha256(HERE / "manifest.json"),
                   "onnx_sha256": {name: manifest["files"][name]["sha256"] for name in manifest["onnx"]}},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", choices=["tensorrt", "onnxruntime"], default="tensorrt",
                    help="tensorrt (default): the engines on this GPU; onnxruntime: the ONNX files on the CPU, for a check without TensorRT")
    ap.add_argument("--out", type=Path, default=HERE / "report.json", help="where to write the report (default: report.json in the bundle)")
    ap.add_argument("--models", help="comma-separated engine names from manifest.json (default: all)")
    ap.add_argument("--rebuild", action="store_true", help="build the engines again even when the .engine files exist")
    ap.add_argument("--min-runs", dest="min_runs", type=int, help="timed runs at least (default: the host bench's)")
    ap.add_argument("--min-duration", dest="min_duration_s", type=float, help="timed seconds at least (default: the host bench's)")
    ap.add_argument("--warmup-ms", dest="warmup_ms", type=float, help="warm-up milliseconds (default: the host bench's)")
    args = ap.parse_args(argv)
    try:
        manifest, sources = check_bundle()  # first of all: nothing from the bundle is read or imported before this
        load_checked(sources)
    except Failure as exc:
        print(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return exc.code
    try:
        rep = run(args, manifest)
    except Failure as exc:
        print(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return exc.code
    except trt_core.TensorRTUnavailable as exc:
        print(f"error: {exc.message} ({exc.hint}); without a GPU, --runtime onnxruntime checks the ONNX files on the CPU", file=sys.stderr)
        return 2
    except trt_core.EngineError as exc:
        print(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 3
    write_atomic(args.out, (json.dumps(rep, indent=2, allow_nan=False) + "\n").encode())
    for m in rep["models"]:
        print(f"{m['name']:<24} accuracy {m['accuracy'] * 100:6.2f}%  agrees w/ teacher {m['agreement'] * 100:6.2f}%  "
              f"p50 {m['latency_ms']['p50']:.3f} ms  p99 {m['latency_ms']['p99']:.3f} ms")
    print(f"report: {shlex.quote(str(args.out))}\nback on the host: compress report RUN_DIR --merge {shlex.quote(args.out.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
