"""Graph simplifiers on the students this tool builds: onnxslim vs onnx-simplifier (onnxsim).

    python benchmarks/export_simplify.py            # prints the tables, writes benchmarks/results/export_simplify.json

Each case is a built-in student (cnn1d, cnn2d, mlp, transformer from compressor/models/student.py) or the
benchmark's residual CNN (benchmarks/models.py:ImageResNet), randomly initialised (BatchNorm running statistics
randomised too, so folding them changes numbers) and exported with compressor.export.onnx_io.export_onnx at
opset 17 with its dynamic batch axis. Each simplifier then runs on the same raw graph with its defaults, and for
every variant we record: node count, onnx.checker(full_check) + strict shape inference, max |ONNX - PyTorch|
and argmax agreement on 512 rows (fed in batches of 64, so the dynamic batch axis is exercised), the time the
simplifier took, and ONNX Runtime batch-1 latency with 1 thread. The three variants of a case are timed in the
same process, interleaved over 3 rounds; the latency ratio is the median p50 over the raw graph's.
Install weight is read from the installed distributions (size on disk, required packages, import time).
"""
from __future__ import annotations

import argparse
import collections
import importlib.metadata as md
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

ROWS, CLASSES, OPSET = 512, 10, 17


def cases():
    """(name, module, rows) for every student family plus the residual CNN."""
    import torch

    from compressor.models.student import cnn1d, cnn2d, mlp, transformer
    from models import ImageResNet

    rng = np.random.default_rng(0)
    signals = rng.standard_normal((ROWS, 40)).astype(np.float32)
    images = rng.random((ROWS, 3, 32, 32), dtype=np.float32)
    tokens = rng.integers(0, 256, (ROWS, 32)).astype(np.int64)
    torch.manual_seed(0)
    out = [("cnn1d", cnn1d((40,), CLASSES, 32), signals), ("cnn2d", cnn2d((3, 32, 32), CLASSES, 16), images),
           ("mlp", mlp((40,), CLASSES, 64), signals), ("transformer", transformer((32,), CLASSES, 32, vocab_size=256), tokens),
           ("resnet (ImageResNet)", ImageResNet(3, CLASSES, 24), images)]
    for _, m, _ in out:
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        m.eval()
    return out


def run_onnxslim(model):
    import onnxslim

    return onnxslim.slim(model)


def run_onnxsim(model):
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return simplified


SIMPLIFIERS = {"onnxslim": run_onnxslim, "onnxsim": run_onnxsim}


def structural_check(model) -> str:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
        return "pass"
    except Exception as exc:  # the reason, for the table
        return f"FAIL: {str(exc).splitlines()[0][:120]}"


def op_delta(before, after) -> str:
    a = collections.Counter(n.op_type for n in before.graph.node)
    b = collections.Counter(n.op_type for n in after.graph.node)
    parts = [f"{op} {b[op] - a[op]:+d}" for op in sorted(set(a) | set(b)) if b[op] != a[op]]
    return ", ".join(parts) or "none"


def install_weight(dist: str, module: str) -> dict:
    d = md.distribution(dist)
    size = sum((f.size or 0) for f in d.files or [])
    requires = [r.split(";")[0].strip() for r in (d.requires or []) if "extra ==" not in r]
    tags = [line.split(":", 1)[1].strip() for line in (d.read_text("WHEEL") or "").splitlines() if line.startswith("Tag:")]
    t = subprocess.run([sys.executable, "-c", f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"],
                       capture_output=True, text=True, check=True)
    return {"version": d.version, "installed_bytes": size, "requires": requires, "wheel_tags": tags,
            "requires_python": d.metadata.get("Requires-Python"), "import_seconds": round(float(t.stdout.strip()), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "export_simplify.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-duration", type=float, default=0.3, help="seconds per latency measurement")
    args = ap.parse_args()

    import onnx
    import torch

    torch.set_num_threads(1)
    from compressor.bench.latency import measure
    from compressor.export.onnx_io import compare, export_onnx, make_session, run_session

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, module, x in cases():
            raw_path = Path(tmp) / f"{name.split()[0]}.onnx"
            export_onnx(module, x, raw_path, OPSET)
            raw = onnx.load(str(raw_path))
            with torch.inference_mode():
                ref = module(torch.from_numpy(x)).numpy()
            variants = {"raw": {"path": raw_path, "model": raw, "seconds": 0.0}}
            for sname, fn in SIMPLIFIERS.items():
                t0 = time.perf_counter()
                try:
                    model = fn(onnx.load(str(raw_path)))
                    err = None
                except Exception as exc:
                    model, err = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
                seconds = time.perf_counter() - t0
                if model is None:
                    variants[sname] = {"error": err, "seconds": seconds}
                    continue
                p = Path(tmp) / f"{name.split()[0]}.{sname}.onnx"
                onnx.save(model, str(p))
                variants[sname] = {"path": p, "model": model, "seconds": seconds}
            sessions = {}
            for vname, v in variants.items():
                if "model" not in v:
                    continue
                v["nodes"] = len(v["model"].graph.node)
                v["check"] = structural_check(v["model"])
                v["ops"] = op_delta(raw, v["model"])
                try:
                    sessions[vname] = make_session(v["path"], threads=1)
                    v.update(compare(ref, run_session(sessions[vname], x, batch_size=64)))
                except Exception as exc:
                    v["error"] = f"ORT: {str(exc)[:150]}"
            one = x[:1]
            p50 = collections.defaultdict(list)
            for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits every variant alike
                for vname, sess in sessions.items():
                    p50[vname].append(measure(lambda: sess.run(None, {"input": one}), warmup_ms=50, min_runs=200,
                                              min_duration_s=args.min_duration)["p50"])
            base = float(np.median(p50["raw"]))
            row = {"case": name, "params": int(sum(p.numel() for p in module.parameters()))}
            for vname, v in variants.items():
                v.pop("model", None)
                v.pop("path", None)
                if vname in p50:
                    v["p50_ms"] = round(float(np.median(p50[vname])), 4)
                    v["latency_ratio"] = round(v["p50_ms"] / base, 3)
                v["seconds"] = round(v["seconds"], 3)
                row[vname] = v
            results.append(row)
            print(f"{name}: " + "; ".join(f"{k} {v.get('nodes', '-')} nodes {v.get('latency_ratio', '-')}x" for k, v in row.items()
                                          if isinstance(v, dict)), file=sys.stderr)

    weight = {"onnxslim": install_weight("onnxslim", "onnxslim"), "onnxsim": install_weight("onnxsim", "onnxsim")}
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": md.version("onnxruntime"), "cpu_threads": 1, "opset": OPSET}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "cases": results, "install": weight}, indent=1) + "\n")

    print("| case | variant | nodes | checker + strict shapes | max abs diff | agreement | simplify s | p50 ms (1 thread, batch 1) | vs raw | op changes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for vname in ("raw", *SIMPLIFIERS):
            v = r[vname]
            if "nodes" not in v:
                print(f"| {r['case']} | {vname} | – | – | – | – | {v['seconds']} | – | – | failed: {v.get('error')} |")
                continue
            print(f"| {r['case']} | {vname} | {v['nodes']} | {v['check']} | {v.get('max_abs_diff', float('nan')):.1e} | "
                  f"{v.get('agreement', float('nan')):.4f} | {v['seconds']} | {v.get('p50_ms', '–')} | {v.get('latency_ratio', '–')} | {v['ops']} |")
    print()
    print("| package | version | installed MB | wheel tags | requires-python | requires | import s |")
    print("|---|---|---|---|---|---|---|")
    for k, w in weight.items():
        print(f"| {k} | {w['version']} | {w['installed_bytes'] / 1e6:.1f} | {', '.join(w['wheel_tags'])} | {w['requires_python']} | "
              f"{', '.join(w['requires']) or '–'} | {w['import_seconds']} |")
    print(f"\n{env}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
