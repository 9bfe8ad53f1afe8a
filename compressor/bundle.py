"""The Jetson deploy bundle: everything a TensorRT device needs to build, check and time the student, and the
merge of the report it writes back into the run's report.

A bundle is a folder (and the same files as a .tar.gz beside it):
  student.int8.onnx, student.onnx   the Q/DQ INT8 and FP32 graphs; engines are built on the device, never shipped
  manifest.json                     input/output, preprocessing, classes, host accuracy, engines and their flags,
                                    versions, and the sha256 and size of every other file (bundle.schema.json)
  SHA256SUMS                        the same checksums (and manifest.json's) for `sha256sum -c`
  build_engine.sh                   trtexec with the flags that fit the target's TensorRT version
  run_on_device.py                  accuracy on heldout.npz and batch-1 latency on the device; writes report.json
  latency.py, trt_core.py           compressor's latency methodology and TensorRT code, verbatim
  heldout.npz                       up to 1,000 held-out rows: x, y and the teacher's predictions
"""
from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import tarfile
import tempfile
import unicodedata
from pathlib import Path

import numpy as np

from . import schemas
from ._io import atomic_path, ensure_dir, sha256_file, write_bytes, write_json, write_text
from .version import __version__
from .errors import CompressError
from .run import Run, now

BUNDLE_SCHEMA_VERSION = 1
HELDOUT_ROWS = 1000
DEFAULT_TENSORRT = "10.3"  # the TensorRT a bundle plans its engines for when the target profile names none (compress bench --remote)
BATCH = {"min": 1, "opt": 1, "max": 32}  # the engines' dynamic batch range (build_engine.sh: MAX_BATCH=… overrides max)
_PKG = Path(__file__).resolve().parent
VERBATIM = {"latency.py": _PKG / "bench" / "latency.py", "trt_core.py": _PKG / "runtime" / "trt_core.py",
            "run_on_device.py": _PKG / "deploy" / "run_on_device.py"}


def validate_manifest(manifest: dict, where: str = "bundle manifest") -> dict:
    return schemas.validate(manifest, "bundle", f"{where} (bundle schema version {BUNDLE_SCHEMA_VERSION})")


def _done(run: Run, stage: str, what: str) -> dict:
    st = run.manifest["stages"].get(stage)
    if not st or st.get("status") != "done":
        raise CompressError(f"compress bundle needs {what}, but stage '{stage}' has not finished in {run.dir}",
                            hint=f"run 'compress {stage} {shlex.quote(str(run.dir))}' first")
    return st


def _onnx_io(path: Path) -> tuple[dict, dict]:
    """The graph's first input and output: name, shape ('batch' for the dynamic axis) and dtype."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def info(v):
        t = v.type.tensor_type
        dims = list(t.shape.dim)
        if not dims or dims[0].HasField("dim_value"):
            raise CompressError(f"{path.name}: '{v.name}' has no dynamic batch axis (shape {[d.dim_value or d.dim_param for d in dims]})",
                                hint="rerun 'compress export RUN --force': the export makes dimension 0 dynamic")
        shape = ["batch", *(int(d.dim_value) if d.HasField("dim_value") else d.dim_param or "?" for d in dims[1:])]
        return {"name": v.name, "shape": shape, "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))}

    inits = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    return info(inputs[0]), info(model.graph.output[0])


def _preprocessing(run: Run, ds) -> dict:
    cfg = run.config.data
    src = cfg.source
    from .data.shards import is_shard_spec

    kind = ("mnist1d" if src == "mnist1d" else "webdataset" if is_shard_spec(src) else "npy_folder" if (Path(src) / "x.npy").is_file()
            else "image_folder" if Path(src).is_dir() else "npz")
    out = {"source": kind, "dtype": str(ds.x.dtype), "mean": cfg.mean, "std": cfg.std, "image_size": None, "channels": None, "resize": None}
    if kind in ("image_folder", "webdataset"):
        c, h, w = ds.input_shape
        resize = cfg.resize if cfg.resize is not None else cfg.crop
        size = ([f"scale the shorter side to {resize} (bilinear), then cut out the centre {h}x{w}"] if resize
                else [f"resize to {h}x{w} (bilinear) if needed"])
        out.update(image_size=[h, w], channels=c, resize=resize, layout="NCHW", steps=[
            "apply the EXIF orientation", f"convert to {'grayscale (L)' if c == 1 else 'RGB'}", *size,
            "scale pixels to [0, 1] (divide by 255; 16-bit greyscale by 65535)",
            *(["subtract mean, divide by std (per channel)"] if cfg.mean is not None or cfg.std is not None else [])])
    else:
        out.update(layout="rows as stored", steps=["none: rows go in exactly as stored in the training data; prepare device inputs the same way"])
    return out


def _sample(ds, n: int) -> np.ndarray:
    """Indices of up to n held-out rows: a seeded random sample, in order."""
    if len(ds.y_test) <= n:
        return np.arange(len(ds.y_test))
    return np.sort(np.random.default_rng(0).choice(len(ds.y_test), n, replace=False))


def _one_line(text) -> str:
    """Text from a profile or a graph made safe for a comment or a markdown line: control, format and line-separator
    characters (a newline would end a shell comment and start a command) become spaces."""
    return "".join(" " if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" else c for c in str(text))


def build_engine_script(target: dict, engines: list[dict], input_info: dict, batch: dict = BATCH) -> str:
    """build_engine.sh: verify the checksums, then one trtexec call per engine with the flags of the target's TensorRT.
    Every value from the profile or the graph is a shlex-quoted word (or a comment made one line); only $TRTEXEC,
    $MAX_BATCH and $found are expanded."""
    q = shlex.quote
    version = str(target["runtime"]["version"])
    rest = "x".join(str(d) for d in input_info["shape"][1:])
    name = input_info["name"]
    lines = [
        "#!/usr/bin/env bash",
        f"# Build this bundle's TensorRT engines on the device: {_one_line(target['description'])}, TensorRT {_one_line(version)}.",
        "# Engines only load on the GPU model and TensorRT version that built them, so build them here, on the target.",
        "# MAX_BATCH=64 bash build_engine.sh raises the largest batch; TRTEXEC=/path/to/trtexec names trtexec.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "sha256sum -c --quiet SHA256SUMS  # first of all: stop before reading or building from a damaged or edited file",
        "",
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'if [ ! -x "$TRTEXEC" ]; then',
        '  echo "error: trtexec not found (JetPack installs it as /usr/src/tensorrt/bin/trtexec; or set TRTEXEC=...)" >&2',
        "  exit 2",
        "fi",
        f'MAX_BATCH="${{MAX_BATCH:-{int(batch["max"])}}}"',
        'case "$MAX_BATCH" in',
        "  ''|0*|*[!0-9]*) printf 'error: MAX_BATCH must be a whole number from 1, not %s\\n' \"$MAX_BATCH\" >&2; exit 2 ;;",
        "esac",
        'found="$(python3 -c \'import tensorrt; print(tensorrt.__version__)\' 2>/dev/null || true)"',
        'case "$found" in',
        f'  ""|{q(version)}|{q(version)}.*) ;;',
        f"  *) printf 'warning: these flags are for TensorRT %s; this device has TensorRT %s\\n' {q(version)} \"$found\" >&2 ;;",
        "esac",
    ]
    for e in engines:
        args = [f"--onnx={e['onnx']}", f"--saveEngine={e['engine']}", *e["trtexec_flags"],
                f"--minShapes={name}:{batch['min']}x{rest}", f"--optShapes={name}:{batch['opt']}x{rest}"]
        max_shapes = q(f"--maxShapes={name}:") + '"${MAX_BATCH}"' + q(f"x{rest}")
        lines += ["", f"# {_one_line(e['name'])}: {_one_line(e['description'])}", f"printf 'building %s\\n' {q(e['engine'])}",
                  '"$TRTEXEC" ' + " ".join(map(q, args)) + " " + max_shapes]
    lines += ["", 'echo "engines built; next: python3 run_on_device.py"', ""]
    return "\n".join(lines)


def _engines(target: dict, fp16_graph: bool = False) -> list[dict]:
    """The engines to build on the device and their flags, planned for the target profile's TensorRT version. With the
    run's FP16 graph (casts in the graph) the FP16 engine is built from it on any version; without it, only TensorRT
    10.x can make one (its FP16 builder flag on the FP32 graph)."""
    from .export.tensorrt import plan_flags

    version = target["runtime"]["version"]
    wanted = [("int8", "student.int8.onnx", "int8", "int8", "INT8 from the Q/DQ graph (explicit quantization, no calibrator)"),
              ("fp32", "student.onnx", "fp32", "fp32", "FP32 from the FP32 graph")]
    from .runtime.trt_core import parse_version

    if fp16_graph:
        wanted.insert(1, ("fp16", "student.fp16.onnx", "fp16", "fp16", "FP16 from the FP16 graph (precision in the graph, strongly typed)"))
    elif parse_version(version)[0] < 11:  # TensorRT 11 has no FP16 flag: an FP16 engine would need an FP16 graph
        wanted.insert(1, ("fp16", "student.onnx", "fp16", "fp32", "FP16 from the FP32 graph (TensorRT 10.x's FP16 builder flag)"))
    out = []
    for name, onnx_file, precision, graph, desc in wanted:
        plan = plan_flags(precision, graph, profile_version=version)
        out.append({"name": name, "onnx": onnx_file, "engine": f"student.{name}.engine", "precision": precision, "graph": graph, "description": desc,
                    "strongly_typed": plan["strongly_typed"], "builder_flags": plan["builder_flags"], "trtexec_flags": plan["trtexec"]})
    return out


def _bundle_target(target: dict, any_target: bool) -> tuple[dict, bool]:
    """The run's target as a TensorRT target (any_target: a target without TensorRT gets engines planned for
    DEFAULT_TENSORRT, its ONNX files running through ONNX Runtime), and whether it is such an ONNX-only target."""
    onnx_only = any_target and (target["runtime"]["name"] != "tensorrt" or not target["runtime"].get("version"))
    if onnx_only:
        target = {**target, "runtime": {**target["runtime"], "name": "tensorrt", "version": DEFAULT_TENSORRT}}
    if target["runtime"]["name"] != "tensorrt":
        raise CompressError(f"the run's target '{target['name']}' runs {target['runtime']['name']}, not TensorRT: a deploy bundle is for TensorRT devices",
                            hint="make the run with a TensorRT target, e.g. --target jetson")
    if not target["runtime"].get("version"):
        raise CompressError(f"target profile '{target['name']}' names no TensorRT version (runtime.version)", hint="add runtime.version, e.g. \"10.3\", to the profile")
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", str(target["runtime"]["version"])):
        raise CompressError(f"target profile '{target['name']}': runtime.version {str(target['runtime']['version'])!r} is not a TensorRT version",
                            hint="write it as MAJOR.MINOR, e.g. \"10.3\"")
    return target, onnx_only


def _bundle_inputs(run, onnx_only: bool) -> tuple[dict, dict, dict]:
    """The quantize stage's record, the run's report and its ONNX files by bundle name, each checked to be there."""
    from .bench.report import load_report
    from .export.tensorrt import graph_precision

    _done(run, "export", "the FP32 ONNX model")
    quant = _done(run, "quantize", "the INT8 Q/DQ model")
    if not run.path("report.json").is_file():
        raise CompressError(f"compress bundle needs the run's report.json (the host accuracy of each ONNX model), which {run.dir} lacks",
                            hint=f"run 'compress bench {shlex.quote(str(run.dir))}' first")
    report = load_report(run.path("report.json"))
    onnx_files = {"student.int8.onnx": run.path(quant["outputs"]["onnx_int8"]),
                  "student.onnx": run.path(run.stage("export")["outputs"]["onnx_fp32"])}
    if "onnx_fp16" in quant["outputs"]:  # the run's FP16 graph, where the target takes FP16
        onnx_files["student.fp16.onnx"] = run.path(quant["outputs"]["onnx_fp16"])
    for name, p in onnx_files.items():
        if not p.is_file():
            raise CompressError(f"{p} is missing from the run", hint=f"rerun 'compress {'quantize' if 'int8' in name else 'export'} {shlex.quote(str(run.dir))} --force'")
    if not onnx_only and graph_precision(onnx_files["student.int8.onnx"]) != "int8":
        raise CompressError(f"{onnx_files['student.int8.onnx']} has no Q/DQ nodes, so TensorRT cannot build an INT8 engine from it",
                            hint=f"rerun 'compress quantize {shlex.quote(str(run.dir))} --force'")
    return quant, report, onnx_files


def make_bundle(run_dir: str | Path, out: str | Path | None = None, *, force: bool = False, heldout_rows: int = HELDOUT_ROWS,
                any_target: bool = False) -> dict:
    """Write the deploy bundle folder and its .tar.gz; returns the bundle's manifest (with 'dir' and 'tarball' added).
    any_target (compress bench --remote): a target without TensorRT is taken too; its engines are planned for
    TensorRT DEFAULT_TENSORRT, and its ONNX files run through ONNX Runtime on the remote machine."""
    from .bench.host import package_version as _version
    from .export.onnx_io import make_session, run_session
    from .runtime import TeacherRunner, infer_batched

    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    target, onnx_only = _bundle_target(run.target, any_target)
    quant, report, onnx_files = _bundle_inputs(run, onnx_only)

    # absolute: '--out .' or '--out ""' must name a real folder (and its tarball a real sibling), not ''
    out = Path(os.path.abspath(out)) if out is not None and str(out) != "" else run.dir / f"bundle-{target['name']}"
    if not out.name:  # '/' (or a drive root): no name, so no tarball beside it, and never a bundle's own folder
        raise CompressError(f"--out {out} is the root of the file system, not a bundle folder", hint="choose a new folder for --out")
    tarball = out.with_name(out.name + ".tar.gz")
    from .ownership import check_bundle_out

    check_bundle_out(out, tarball, run.dir, force)  # never the run itself, nor a folder or tarball of someone else's

    # the held-out sample, the teacher's answers on it, and each ONNX model's accuracy on it here on the host
    ds = run.data
    idx = _sample(ds, heldout_rows)
    x, y = np.ascontiguousarray(ds.x_test[idx]), np.asarray(ds.y_test[idx], np.int64)
    distill = run.stage("distill")["result"]
    heldout_pred = run.teacher_heldout_pred()  # recorded by distill: the teacher is not run (nor a black box asked) again
    if heldout_pred is not None:
        teacher_pred = heldout_pred[idx]
    else:
        with TeacherRunner(run.teacher, 1, num_classes=distill.get("num_classes")) as t:
            teacher_pred = infer_batched(t, x, 256).argmax(1).astype(np.int64)
    by_path = {m["path"]: m for m in report["models"] if m.get("latency_measured_on", "host") == "host"}
    onnx_info = {}
    for name, p in onnx_files.items():
        pred = run_session(make_session(p), x).argmax(1)
        row = by_path.get(os.path.relpath(p, run.dir), {})
        onnx_info[name] = {"precision": "int8" if "int8" in name else "fp16" if "fp16" in name else "fp32", "params": int(distill["params"]),
                           "host_accuracy": row.get("accuracy"), "host_heldout_rows": int(report["data"]["heldout"]),
                           "host_accuracy_bundled_rows": float(np.mean(pred == y)), "host_agreement_bundled_rows": float(np.mean(pred == teacher_pred))}
    onnx_info["student.int8.onnx"]["recipe"] = quant["result"]["recipe"]
    input_info, output_info = _onnx_io(onnx_files["student.onnx"])
    engines = _engines(target, fp16_graph="student.fp16.onnx" in onnx_files)
    classes = ds.class_names if ds.class_names else list(range(int(distill["num_classes"])))
    cfg = run.config.bench
    manifest = {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "created": now(),
        "bundle": out.name,
        "run": {"dir": str(run.dir.resolve()), "created": run.manifest["created"], "report_created": report["created"]},
        "target": {"name": target["name"], "description": target["description"], "kind": target["kind"], "runtime": "tensorrt",
                   "tensorrt_version": str(target["runtime"]["version"]), "platform": target["runtime"].get("platform")},
        "input": input_info,
        "output": output_info,
        "preprocessing": _preprocessing(run, ds),
        "classes": {"names": classes, "kind": "names" if ds.class_names else "indices"},
        "onnx": onnx_info,
        "engines": engines,
        "batch": dict(BATCH),
        "heldout": {"file": "heldout.npz", "rows": int(len(idx)), "of": int(len(ds.y_test)), "selection": "seeded random sample (seed 0), in order" if len(idx) < len(ds.y_test) else "all",
                    "arrays": ["x", "y", "teacher_pred", "index"], "data": dict(report["data"])},
        "bench": {"batch_size": cfg.batch_size, "threads": cfg.threads, "warmup_ms": cfg.warmup_ms, "warmup_runs": cfg.warmup_runs,
                  "min_runs": cfg.min_runs, "min_duration_s": cfg.min_duration_s},
        "versions": {"compressor": __version__, **{p: v for p in ("torch", "onnx", "onnxruntime", "numpy") if (v := _version(p))}},
        "files": {},
    }

    ensure_dir(out.parent)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        for name, p in onnx_files.items():
            write_bytes(stage / name, p.read_bytes())
        for name, src in VERBATIM.items():
            write_bytes(stage / name, src.read_bytes())
        buf = io.BytesIO()
        np.savez(buf, x=x, y=y, teacher_pred=teacher_pred, index=idx.astype(np.int64))
        write_bytes(stage / "heldout.npz", buf.getvalue())
        write_text(stage / "build_engine.sh", build_engine_script(target, engines, input_info))
        write_text(stage / "README.md", _readme(manifest))
        for f in sorted(stage.iterdir()):
            manifest["files"][f.name] = {"sha256": sha256_file(f), "size_bytes": f.stat().st_size}
        validate_manifest(manifest)
        write_json(stage / "manifest.json", manifest)
        sums = {**{k: v["sha256"] for k, v in manifest["files"].items()}, "manifest.json": sha256_file(stage / "manifest.json")}
        write_text(stage / "SHA256SUMS", "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
        for f in ("build_engine.sh", "run_on_device.py"):
            os.chmod(stage / f, 0o755)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the usual permissions
        _replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _write_tarball(out, tarball)
    return {**manifest, "dir": str(out), "tarball": str(tarball)}


def _replace_dir(new: Path, final: Path) -> None:
    """Put the finished folder under its final name; an old one (--force) is moved aside first, then removed."""
    old = None
    if final.exists():
        if not final.is_dir():
            raise CompressError(f"{final} exists and is not a folder", hint="pass another --out")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_tarball(folder: Path, tarball: Path) -> None:
    with atomic_path(tarball) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for f in sorted(folder.iterdir()):
                tar.add(f, arcname=f"{folder.name}/{f.name}", recursive=False)


def _readme(m: dict) -> str:
    t, i = m["target"], m["input"]  # text from the profile and the graph: one line each, never a line of its own
    return "\n".join([
        f"# Deploy bundle for {_one_line(t['description'])} (TensorRT {_one_line(t['tensorrt_version'])})", "",
        "On the device:", "",
        "    bash build_engine.sh          # checks every file (sha256sum -c SHA256SUMS), then builds the engines with trtexec",
        "    python3 run_on_device.py      # accuracy on heldout.npz and batch-1 latency; writes report.json", "",
        "run_on_device.py needs numpy, tensorrt and cuda-python (or a CUDA build of torch); without the engines it builds them",
        "itself. `python3 run_on_device.py --runtime onnxruntime` runs the ONNX files on the CPU instead.", "",
        "Back on the host:", "", "    compress report RUN_DIR --merge report.json", "",
        f"Input '{_one_line(i['name'])}': {_one_line(i['dtype'])}, shape {_one_line(i['shape'])} (dimension 0 is the batch).",
        "manifest.json lists the preprocessing, the classes, the host accuracy of each ONNX model and every file's sha256.", ""])


# --- merging a device report back into the run -----------------------------------------------------------
def _check_onnx_sha256(run: Run, path: Path, bundle: dict) -> None:
    """The device report's bundle.onnx_sha256 must name every ONNX file a bundle of this run ships, each with this run's
    checksum: otherwise nothing ties its rows to this run's models."""
    again = f"make a new bundle ('compress bundle {shlex.quote(str(run.dir))} --force') and run it on the device again"
    got = bundle.get("onnx_sha256") if isinstance(bundle, dict) else None
    if not isinstance(got, dict) or not got:
        raise CompressError(f"{path} names no ONNX checksums (bundle.onnx_sha256), so nothing ties its rows to this run's models",
                            hint=f"pass the report.json that run_on_device.py wrote, unedited; or {again}")
    quant = run.manifest["stages"].get("quantize", {}).get("outputs", {})
    ours = {"student.int8.onnx": quant.get("onnx_int8"), "student.onnx": run.manifest["stages"].get("export", {}).get("outputs", {}).get("onnx_fp32"),
            **({"student.fp16.onnx": quant["onnx_fp16"]} if quant.get("onnx_fp16") else {})}
    if unknown := sorted(set(got) - set(ours)):
        raise CompressError(f"{path} names {', '.join(map(str, unknown))}, which this run has no ONNX file for", hint=again)
    if missing := sorted(set(ours) - set(got)):
        raise CompressError(f"{path} lacks the checksum of {', '.join(missing)} (bundle.onnx_sha256)", hint=again)
    for name, rel in ours.items():
        local = run.path(rel) if rel else None
        if local is None or not local.is_file() or sha256_file(local) != got[name]:
            raise CompressError(f"{path} measured a different {name} than this run's", hint=again)


def merge_device_report(run_dir: str | Path, device_report: str | Path, *, remote: str | None = None) -> dict:
    """Fold the rows of run_on_device.py's report.json into the run's report.json (both validated); returns the merged report.
    remote (compress bench --remote): the user@host it ran on; rows are then marked '(on user@host)' and their device
    says 'remote user@host …'."""
    from .bench.report import load_report, validate_report

    run = Run.open(run_dir)
    rep = load_report(run.path("report.json"))
    path = Path(device_report)
    dev = load_report(path)
    if dev["target"]["latency_measured_on"] != "target" or "bundle" not in dev:
        raise CompressError(f"{path} is not a device report (run_on_device.py writes one)", hint="pass the report.json that run_on_device.py wrote on the device")
    _check_onnx_sha256(run, path, dev["bundle"])
    where = dev["host"].get("board") or dev["host"].get("gpu") or dev["host"]["cpu"]
    source = {"report": path.name, "created": dev["created"], "hostname": dev["host"].get("hostname"), "target": dev["target"]["name"],
              "runtime": dev["target"]["runtime"], **({"remote": remote} if remote else {})}
    key = (source["target"], source["hostname"], source["runtime"], remote)
    on = remote or dev["target"]["name"]
    # a newer report from the same device, target and runtime replaces the rows an earlier merge added
    kept = [m for m in rep["models"] if not (m.get("merged_from") and
                                             (m["merged_from"]["target"], m["merged_from"]["hostname"], m["merged_from"]["runtime"],
                                              m["merged_from"].get("remote")) == key)]
    added = []
    for m in dev["models"]:
        row = dict(m)
        device = f"remote {remote} {m['device'].removeprefix('target ')}: {where}" if remote else f"{m['device']}: {where}"
        row.update(name=f"{m['name']} (on {on})", latency_measured_on="target", merged_from=source,
                   path=f"{dev['bundle'].get('name', 'bundle')}/{m['path']}", device=device)
        added.append(row)
    rep["models"] = kept + added
    by = f"by run_on_device.py over SSH on {remote}" if remote else "by run_on_device.py"
    note = (f"Rows marked '(on {on})' were measured on the device ({where}) with {dev['target']['runtime']} {by} "
            f"({dev['created']}, merged from {path.name}); their accuracy is on the {dev['data']['heldout']} held-out rows shipped in the bundle"
            + (f", not on all {rep['data']['heldout']}." if dev["data"]["heldout"] < rep["data"]["heldout"] else " (all of them)."))
    rep["notes"] = [n for n in rep.get("notes", []) if not n.startswith(f"Rows marked '(on {on})'")] + [note]
    validate_report(rep, f"{run.path('report.json')} merged with {path}")
    write_json(run.path("report.json"), rep)
    return rep
