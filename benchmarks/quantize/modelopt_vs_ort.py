"""NVIDIA Model Optimizer's ONNX PTQ (modelopt.onnx.quantization, INT8) against our TensorRT INT8 recipe (ONNX Runtime
quantize_static: QDQ, s8/s8 symmetric, float biases, per-channel weights) on the quantize benchmark's models.

modelopt lives in its own virtual environment (never in .venv: it pins onnxruntime-gpu ~=1.24 and pulls cupy-cuda12x).
Set it up once:

    python3 -m venv /tmp/mo-venv
    /tmp/mo-venv/bin/pip install torch==2.13.0 'nvidia-modelopt[onnx]' onnxruntime

Then, from the repository root, with the project's own environment (scikit-learn, compressor, onnxruntime CPU):

    .venv/bin/python benchmarks/quantize/modelopt_vs_ort.py --models-dir /tmp/qb-full

--models-dir holds the FP32 ONNX files that benchmarks/quantize/run.py exported (digits16-resnet.onnx,
digits32-resnet.onnx, digits-mlp.onnx, run16/student.onnx). The data is regenerated with run.py's digits(); both tools
calibrate on the same 512 training rows, batch 1; every model is evaluated with ONNX Runtime CPU on the held-out split.
modelopt runs in a subprocess of --mo-python (one per variant), calibrating with calibration_eps=["cpu"].
Writes every number to runs/modelopt-vs-ort/results.json (with the quantized models beside it); the tables of
benchmarks/results/modelopt_vs_ort.md were written from that file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

MODELS = {  # name: (file under --models-dir, digits() size)
    "digits16-student": ("run16/student.onnx", 16),
    "digits16-resnet": ("digits16-resnet.onnx", 16),
    "digits32-resnet": ("digits32-resnet.onnx", 32),
    "digits-mlp": ("digits-mlp.onnx", None),
}
ORT_VARIANTS = {  # name: calibration method of our "tensorrt" recipe
    "ort tensorrt minmax": "minmax",
    "ort tensorrt entropy": "entropy",
}
MO_VARIANTS = {  # name: keyword arguments of modelopt.onnx.quantization.quantize (besides paths, data, eps)
    "modelopt max": {"calibration_method": "max", "high_precision_dtype": "fp32"},
    "modelopt entropy": {"calibration_method": "entropy", "high_precision_dtype": "fp32"},
    "modelopt max, dq_only": {"calibration_method": "max", "high_precision_dtype": "fp32", "dq_only": True},
    "modelopt max, gemv rule off": {"calibration_method": "max", "high_precision_dtype": "fp32", "enable_gemv_detection_for_trt": False},
    "modelopt defaults (entropy, fp16)": {},
}


# ---------------------------------------------------------------------------------------------------------------
# worker: runs inside the modelopt environment
def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    calib = np.load(spec["calib"])["calib"]
    out = {"ok": False}
    t0 = time.perf_counter()
    try:
        import modelopt
        import onnxruntime
        from modelopt.onnx.quantization import quantize

        out["versions"] = {"modelopt": modelopt.__version__, "onnxruntime": onnxruntime.__version__,
                           "providers": onnxruntime.get_available_providers()}
        quantize(onnx_path=spec["fp32"], quantize_mode="int8", calibration_data=calib, calibration_eps=["cpu"],
                 output_path=spec["out"], log_file=spec["log"], **spec["kwargs"])
        out["ok"] = Path(spec["out"]).exists()
    except BaseException as exc:  # noqa: BLE001 - the report says what went wrong
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc).strip() else ''}"
    out["build_s"] = round(time.perf_counter() - t0, 2)  # includes importing modelopt (and torch): about 2 s
    Path(spec["result"]).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------------------------
# orchestration: runs in the project's environment
_FLOAT_READ_OPS = ("Conv", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape")


def qdq_placement(path: Path) -> dict:
    """Where the Q/DQ pairs sit: Q/DQ node counts, which ops read activations through a DequantizeLinear (Add inputs
    counted one by one), how weights are stored (int8 initializer -> DQ, or float initializer -> Q -> DQ), whether the
    graph output or graph input is quantized, and which compute ops read float activations."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)

    def is_weight_dq(dq) -> str:
        src = dq.input[0]
        if src in inits:
            return "int8 init"
        q = prod.get(src)
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits:
            return "float init + Q"
        return ""

    ops = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    act_reads, float_reads, weight_store = {}, {}, {}
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, i in enumerate(n.input):
            if not i or i in inits:
                continue
            p = prod.get(i)
            if p is not None and p.op_type == "DequantizeLinear":
                w = is_weight_dq(p)
                if w:
                    weight_store[w] = weight_store.get(w, 0) + 1
                else:
                    act_reads[n.op_type] = act_reads.get(n.op_type, 0) + 1
            elif n.op_type in _FLOAT_READ_OPS and (p is None or p.op_type not in ("Constant", "Shape")) and not (n.op_type == "Reshape" and k == 1):
                float_reads[n.op_type] = float_reads.get(n.op_type, 0) + 1  # a compute op reading a float activation
    outputs = [o.name for o in g.output]
    out_q = any(prod.get(o) is not None and prod[o].op_type == "DequantizeLinear" for o in outputs)
    in_q = any(c.op_type == "QuantizeLinear" for x in g.input for c in cons.get(x.name, []))
    dtypes = sorted({onnx.TensorProto.DataType.Name(t.data_type) for t in g.initializer})
    return {"Q": ops.get("QuantizeLinear", 0), "DQ": ops.get("DequantizeLinear", 0), "act_qdq_feeds": dict(sorted(act_reads.items())),
            "float_act_reads": dict(sorted(float_reads.items())), "weights": weight_store, "output_quantized": out_q,
            "input_quantized": in_q, "initializer_dtypes": dtypes, "ops": dict(sorted(ops.items()))}


def evaluate(path: Path, xt, yt, ref, latency: bool) -> dict:
    from compressor.export.onnx_io import make_session, run_session

    sess = make_session(path, threads=None)
    logits = run_session(sess, xt).astype(np.float32)
    row = {"accuracy": float(np.mean(logits.argmax(1) == yt)), "agreement_with_fp32": float(np.mean(logits.argmax(1) == ref.argmax(1))),
           "max_abs_logit_diff": float(np.max(np.abs(logits - ref))), "size_bytes": path.stat().st_size}
    if latency:
        from compressor.bench.latency import measure

        s1 = make_session(path, threads=1)
        name = s1.get_inputs()[0].name
        one = np.ascontiguousarray(xt[:1])
        row["p50_ms_cpu_1thread"] = measure(lambda: s1.run(None, {name: one}), warmup_ms=50, min_runs=200, min_duration_s=0.3)["p50"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/qb-full"))
    ap.add_argument("--mo-python", default="/tmp/mo-venv/bin/python")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "modelopt-vs-ort")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--results", type=Path, default=None, help="default: WORK/results.json")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    import onnx
    import onnxruntime

    from compressor.export.onnx_io import make_session, run_session
    from compressor.export.quantize import check_tensorrt_qdq, get_recipe, preprocess, qdq_summary, quantize_with
    from run import digits

    a.work.mkdir(parents=True, exist_ok=True)
    a.results = a.results or a.work / "results.json"
    res = {"date": time.strftime("%Y-%m-%d"), "versions": {"onnxruntime (evaluation, ORT recipe)": onnxruntime.__version__, "onnx": onnx.__version__},
           "models": {}}
    data_cache: dict = {}
    for name in a.models.split(","):
        rel, size = MODELS[name]
        fp32 = a.models_dir / rel
        if size not in data_cache:
            data_cache[size] = digits(size)
        x, y, xt, yt = data_cache[size]
        d = a.work / name
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(x))
        calib = np.ascontiguousarray(x[order[:512]])
        np.savez(d / "calib.npz", calib=calib)
        ref = run_session(make_session(fp32, threads=None), xt)
        print(f"{name}: {len(x)} train rows, {len(xt)} held-out", flush=True)
        rows = {"fp32": {"path": fp32}}
        pre = d / "pre.onnx"
        preprocess(fp32, pre)
        for v, method in ORT_VARIANTS.items():
            out = d / (v.replace(" ", "-") + ".onnx")
            t0 = time.perf_counter()
            try:
                quantize_with(get_recipe("tensorrt"), fp32, pre, out, calib, method, True)
                rows[v] = {"path": out, "build_s": round(time.perf_counter() - t0, 2)}
            except Exception as exc:  # noqa: BLE001
                rows[v] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            print(f"  {v}: {rows[v].get('build_s', rows[v].get('error'))}", flush=True)
        for v, kwargs in MO_VARIANTS.items():
            stem = v.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
            spec = {"fp32": str(fp32), "calib": str(d / "calib.npz"), "out": str(d / f"{stem}.onnx"), "log": str(d / f"{stem}.log"),
                    "result": str(d / f"{stem}.json"), "kwargs": kwargs}
            Path(spec["result"]).unlink(missing_ok=True)
            Path(spec["out"]).unlink(missing_ok=True)
            (d / f"{stem}.spec.json").write_text(json.dumps(spec))
            t0 = time.perf_counter()
            proc = subprocess.run([a.mo_python, str(Path(__file__).resolve()), "--worker", str(d / f"{stem}.spec.json")],
                                  capture_output=True, text=True, cwd=str(d))
            (d / f"{stem}.stderr").write_text(proc.stdout + proc.stderr)
            r = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else {
                "ok": False, "error": f"worker exited {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"}
            r["wall_s_with_import"] = round(time.perf_counter() - t0, 2)
            res["versions"].setdefault("modelopt env", r.get("versions"))
            rows[v] = {"path": Path(spec["out"]), "build_s": r.get("build_s"), "wall_s_with_import": r["wall_s_with_import"]} if r.get("ok") else \
                {"error": r.get("error"), "wall_s_with_import": r["wall_s_with_import"]}
            print(f"  {v}: {rows[v].get('build_s', rows[v].get('error'))}", flush=True)
        for v, row in rows.items():
            if "path" not in row:
                continue
            p = row.pop("path")
            row["file"] = str(p)
            try:
                row.update(evaluate(p, xt, yt, ref, latency=not a.no_latency))
            except Exception as exc:  # noqa: BLE001
                row["eval_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            if v != "fp32":
                problems = check_tensorrt_qdq(p)
                row["tensorrt_qdq_problems"] = len(problems)
                row["tensorrt_qdq_first"] = problems[:6]
                row["qdq_summary"] = qdq_summary(p)
                row["placement"] = qdq_placement(p)
                try:
                    onnx.checker.check_model(str(p), full_check=True)
                    row["onnx_checker"] = "ok"
                except Exception as exc:  # noqa: BLE001
                    row["onnx_checker"] = str(exc).splitlines()[0][:200]
                row["opset"] = {o.domain or "ai.onnx": o.version for o in onnx.load(str(p), load_external_data=False).opset_import}
            else:
                row["placement"] = {"ops": qdq_placement(p)["ops"]}
        for row in rows.values():
            if "accuracy" in row:
                row["delta_points"] = 100 * (row["accuracy"] - rows["fp32"]["accuracy"])
        res["models"][name] = {"heldout_rows": int(len(yt)), "calib_rows": int(len(calib)), "input_shape": list(x.shape[1:]), "variants": rows}
        a.results.write_text(json.dumps(res, indent=1, default=str))
    a.results.write_text(json.dumps(res, indent=1, default=str))
    for name, m in res["models"].items():
        print(f"\n{name}")
        for v, r in m["variants"].items():
            if "accuracy" in r:
                print(f"  {v:36s} acc {100 * r['accuracy']:6.2f} Δ {r['delta_points']:+6.2f} trt-problems {r.get('tensorrt_qdq_problems', '-')!s:>3} "
                      f"Q {r.get('placement', {}).get('Q', '-')} DQ {r.get('placement', {}).get('DQ', '-')} int8 {r.get('qdq_summary', {}).get('int8', '-')}")
            else:
                print(f"  {v:36s} {r.get('error') or r.get('eval_error')}")


if __name__ == "__main__":
    main()
