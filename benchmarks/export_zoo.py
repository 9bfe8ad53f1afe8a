"""The zoo of students people write (tests/zoo_models.py) through the export chain and every INT8 recipe, on this host.

    python benchmarks/export_zoo.py        # writes benchmarks/results/export_zoo.md and .json (about 5 minutes)

For each student: which exporter made the graph (and why the other was not used), the numeric check against PyTorch at
a batch of 16 (the export saw 2 rows), the TensorRT 10.3 operator list, the tensorrt recipe's Q/DQ rule check, every
cpu-auto candidate for this CPU, and batch-1 latency on one thread of FP32 and of the fastest INT8 candidate (median
of 3 interleaved rounds of 0.2 s each). Also each exporter's time per model, which sets the chain's order.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> None:
    import tempfile

    import numpy as np
    import torch

    from compressor.bench.host import describe_host, has_vnni
    from compressor.bench.latency import measure
    from compressor.errors import CompressError
    from compressor.export.onnx_io import EXPORTERS, compare, export_onnx, make_session, run_session
    from compressor.export.op_support import check_runtime_ops
    from compressor.export.quantize import auto_candidates, check_tensorrt_qdq, get_recipe, preprocess, quantize_with
    from compressor.targets import get_target
    from zoo_models import ZOO, build, make_input

    t_start = time.perf_counter()
    rows = []
    for name in ZOO:
        m, _ = build(name)
        x = make_input(name, 16)
        with torch.no_grad():
            y = m(torch.from_numpy(x))
        ref = (y[0] if isinstance(y, tuple) else next(iter(y.values())) if isinstance(y, dict) else y).numpy()
        row = {"model": name, "params": int(sum(p.numel() for p in m.parameters()))}

        def verify(path, ref=ref, x=x):  # the export stage's numeric check, at a batch the export did not see
            got = compare(ref, run_session(make_session(path), x))
            if got["max_abs_diff"] > 1e-4:
                raise CompressError(f"max abs diff {got['max_abs_diff']:.1e} against PyTorch")
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            for ex in EXPORTERS:  # each exporter alone: its own success and time
                t0 = time.perf_counter()
                try:
                    export_onnx(m, x, d / f"{ex}.onnx", 17, exporters=(ex,), verify=verify)
                    row[f"{ex}_s"] = round(time.perf_counter() - t0, 2)
                except CompressError as exc:
                    row[f"{ex}_s"] = None
                    row[f"{ex}_error"] = exc.message[:160]
            fp32 = d / "m.onnx"
            try:
                info = export_onnx(m, x, fp32, 17, verify=verify)
            except CompressError as exc:
                row["error"] = str(exc)[:300]
                rows.append(row)
                print(name, "cannot ship:", row["error"][:120], flush=True)
                continue
            diff = compare(ref, run_session(make_session(fp32), x))
            row.update(exporter=info["exporter"], opset=info["opset"], max_abs_diff=diff["max_abs_diff"])
            try:
                check_runtime_ops(fp32, get_target("jetson"), info["opset"])
                row["tensorrt_ops"] = "pass"
            except CompressError as exc:
                row["tensorrt_ops"] = exc.message[:120]
            pre = d / "pre.onnx"
            preprocess(fp32, pre)
            trt = d / "trt.onnx"
            quantize_with(get_recipe("tensorrt"), fp32, pre, trt, x)
            row["tensorrt_qdq"] = "pass" if not check_tensorrt_qdq(trt) else "fail"
            built = {}
            for recipe in auto_candidates("cpu-auto", fp32, has_vnni()):
                q = d / f"{recipe}.onnx"
                quantize_with(get_recipe(recipe), fp32, pre, q, x)
                built[recipe] = q
            row["int8_recipes"] = ["tensorrt"] + list(built)
            sessions = {"fp32": make_session(fp32, threads=1), **{r: make_session(p, threads=1) for r, p in built.items()}}
            x1 = np.ascontiguousarray(x[:1])
            feed = sessions["fp32"].get_inputs()[0].name
            p50 = {k: [] for k in sessions}
            for _ in range(3):
                for k, s in sessions.items():
                    p50[k].append(measure(lambda: s.run(None, {feed: x1}), warmup_ms=20, min_runs=50, min_duration_s=0.2)["p50"])
            med = {k: float(np.median(v)) for k, v in p50.items()}
            best = min((k for k in med if k != "fp32"), key=lambda k: med[k])
            row.update(fp32_ms=round(med["fp32"], 4), int8_ms=round(med[best], 4), int8_best=best, int8_speedup=round(med["fp32"] / med[best], 2))
        rows.append(row)
        print(name, row.get("exporter"), row.get("int8_best"), row.get("int8_speedup"), flush=True)
    res = {"host": describe_host(), "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t_start), "rows": rows}
    out = HERE / "results" / "export_zoo.md"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    h = res["host"]
    ts = [r["torchscript_s"] for r in rows if r.get("torchscript_s") is not None]
    dy = [r["dynamo_s"] for r in rows if r.get("dynamo_s") is not None]
    lines = ["# Export zoo: the students people write, through the exporter chain and every INT8 recipe", "",
             f"`python benchmarks/export_zoo.py` on {h['cpu']} ({h['cpu_count']} cores; {', '.join(h.get('cpu_features') or [])}), {res['date']}, "
             f"{res['seconds']} s. Models: `tests/zoo_models.py` (untrained, BatchNorm statistics randomised). Numeric check at a batch of 16 "
             "(the export saw 2 rows). Latency: batch 1, one thread, median of 3 interleaved rounds; INT8 is the fastest cpu-auto candidate.", "",
             f"Exporters alone: TorchScript-based {len(ts)}/{len(rows)} exported, median {np.median(ts):.2f} s, max {max(ts):.2f} s; "
             f"torch.export-based {len(dy)}/{len(rows)}, median {np.median(dy):.2f} s, max {max(dy):.2f} s. The chain tries the "
             "TorchScript-based one first.", "",
             "| model | params | exporter used | ONNX check (max abs diff) | TensorRT ops | TensorRT Q/DQ rules | INT8 recipes built | FP32 ms | INT8 ms (recipe) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['params']:,} | none: {r['error'][:150]} | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['params']:,} | {r['exporter']} (opset {r['opset']}) | pass ({r['max_abs_diff']:.1e}) | {r['tensorrt_ops']} | "
                     f"{r['tensorrt_qdq']} | {', '.join(r['int8_recipes'])} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} ({r['int8_best']}) | {r['int8_speedup']:.2f}x |")
    lines.append("")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
