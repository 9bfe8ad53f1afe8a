"""--student auto against its issue's bar: budgets of 0.25x and 0.1x the teacher's MACs on a residual CNN teacher
(32×32 RGB digits, benchmarks/auto_task.py) and on a token-id transformer teacher (benchmarks/distill/seq_task.py),
each run through the whole pipeline (distill with the candidates, export, INT8, bench) and compared with the same
architecture trained on the labels alone; a latency budget on this host; the built-in image student against
MobileNetV3-small at 224×224 (parameters and MACs) and against the old built-in student (accuracy in the same steps).

    python benchmarks/student_auto.py                       # every case, results/student_auto.{md,json}
    python benchmarks/student_auto.py --cases digits32-0.25  # one
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "distill"))

# timm 1.0.31 (torch 2.14.1, torchvision 0.29.1), pretrained=False, counted with torch.utils.flop_counter: measured in a
# separate environment, since timm has no working torchvision beside the CPU build of torch 2.13.0 (README "timm")
MNV3_SMALL_224 = {"name": "timm mobilenetv3_small_100", "params": 2_542_856, "macs": 56_510_000}


def _cases(work: Path) -> dict:
    import auto_task
    import seq_task

    img = auto_task.prepare(work)
    seq = seq_task.prepare(work)
    image = dict(teacher=str(img["teacher"]), arch=img["arch"], data=str(img["data"]), steps=400, batch=64, info=img["teacher_info"])
    tokens = dict(teacher=str(seq["teacher"]), arch=str(seq["arch"]), data=str(seq["data"]), steps=400, batch=64, info=seq["teacher_info"])
    ts = work / "digits32_teacher.ts.pt"
    if not ts.exists():
        import numpy as np
        import torch

        m = auto_task.build_teacher()
        m.load_state_dict(torch.load(img["teacher"], weights_only=True))
        x = np.load(img["data"])["x"][:2]
        torch.jit.save(torch.jit.trace(m.eval(), (torch.from_numpy(x),)), str(ts))
    return {
        "digits32-0.25": dict(image, budget=["macs=0.25"]),
        "digits32-0.1": dict(image, budget=["macs=0.1"]),
        "seq-0.25": dict(tokens, budget=["macs=0.25"]),
        "seq-0.1": dict(tokens, budget=["macs=0.1"]),
        "seq-0.1-2000": dict(tokens, budget=["macs=0.1"], steps=2000),  # the same at a longer schedule
        "digits32-latency": dict(image, budget=["latency_ms=LAT"]),
        # the built-in image student against the old one, same steps: a TorchScript teacher, so nothing is pruned
        "digits32-mobilenet": dict(image, teacher=str(ts), arch=None, budget=["params=0.1"]),
        "digits32-old-builtin": dict(image, teacher=str(ts), arch=None, student=None, budget=None),
    }


def run_case(name: str, case: dict, work: Path) -> dict:
    from compressor import api
    from compressor.config import BenchConfig, CompressConfig, DataConfig, DistillConfig

    student = case.get("student", "auto")
    dcfg = DistillConfig(student=student, budget=case["budget"], steps=case["steps"], batch_size=case["batch"], baseline=True,
                         device="cpu", seed=0)
    cfg = CompressConfig(teacher=case["teacher"], teacher_arch=case.get("arch"), target="cpu", data=DataConfig(source=case["data"]),
                         distill=dcfg, bench=BenchConfig(min_runs=100, min_duration_s=0.5, repeat=3))
    out = work / "runs" / name
    t0 = time.perf_counter()
    rep = api.compress(cfg, out, force=True)
    wall = time.perf_counter() - t0
    res = json.loads((out / "manifest.json").read_text())["stages"]["distill"]["result"]
    by = {m["name"]: m for m in rep["models"]}
    row = {"case": name, "wall_s": round(wall, 1), "budget": case["budget"], "teacher_acc": by["teacher"]["accuracy"],
           "teacher_params": res["teacher_params"], "teacher_macs": res.get("teacher_macs"), "params": res["params"], "macs": res.get("macs"),
           "student_acc": by["student"]["accuracy"], "int8_acc": by["student onnx int8"]["accuracy"], "fp32_onnx_acc": by["student onnx fp32"]["accuracy"],
           "baseline_acc": by["baseline (labels only)"]["accuracy"], "p50_ms": {k: v["latency_ms"]["p50"] for k, v in by.items()},
           "export_check": rep["checks"]["export"], "gate": rep.get("gate")}
    if "auto" in res:
        a = res["auto"]
        row.update(limits=a["limits"], winner=a["winner"], candidates=a["candidates"], skipped=a["skipped"], latency_kind=a["latency"])
    return row


def sizes_at_224() -> dict:
    import torch

    from compressor.models.budget import count
    from compressor.models.families import mobilenet
    from compressor.models.student import cnn2d

    x = torch.zeros(1, 3, 224, 224)
    ours = count(mobilenet((3, 224, 224), 1000, 1.0), x)
    old = count(cnn2d((3, 224, 224), 1000, 32), x)
    return {"builtin:mobilenet width 1.0": {"params": ours[0], "macs": ours[1]}, MNV3_SMALL_224["name"]: MNV3_SMALL_224,
            "old builtin:cnn2d width 32": {"params": old[0], "macs": old[1]}}


def render(rows: list[dict], sizes: dict) -> str:
    from compressor.models.budget import human

    lines = ["# --student auto", "", "Command: `python benchmarks/student_auto.py` (one run per case: distill with the candidates, export, "
             "INT8, bench; 400 steps at batch 64 unless the case says otherwise, each candidate distilled 100 steps; `--target cpu`; "
             "2-core AMD EPYC, AVX2, no VNNI).", "",
             "## Budgets", "",
             "| case | budget | limit | winner | student MACs (of limit) | params | teacher acc | student acc | INT8 acc | labels-only acc (same arch) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lim = r.get("limits") or {}
        key = "macs" if "macs" in lim else "params" if "params" in lim else None
        of = f" ({r[key] / lim[key]:.0%})" if key else ""
        limit = ", ".join(f"{k} {v:g} ms" if k == "latency_ms" else f"{k} {human(v)}" for k, v in lim.items()) or "-"
        lines.append(f"| {r['case']} | {','.join(r['budget'] or ['-'])} | {limit} | {r.get('winner', 'old default')} | {human(r['macs'])}{of} | "
                     f"{r['params']:,} | {r['teacher_acc'] * 100:.2f} | {r['student_acc'] * 100:.2f} | {r['int8_acc'] * 100:.2f} | {r['baseline_acc'] * 100:.2f} |")
    lines += ["", "## Candidates", "", "| case | candidate | params | MACs | latency ms | val acc % | seconds | won |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for c in r.get("candidates") or []:
            acc = "-" if c.get("val_accuracy") is None else f"{c['val_accuracy'] * 100:.2f}"
            lat = "-" if c.get("latency_ms") is None else f"{c['latency_ms']:.3f}"
            lines.append(f"| {r['case']} | {c['name']} | {human(c['params'])} | {human(c['macs'])} | {lat} | {acc} | {c['seconds']:.0f} | {'yes' if c['won'] else ''} |")
    lat = [r for r in rows if "latency_ms" in (r.get("limits") or {})]
    if lat:
        lines += ["", "## Latency budget", ""]
        for r in lat:
            lines.append(f"{r['case']}: budget {r['limits']['latency_ms']:.3f} ms ({r['latency_kind']}); the bench stage then measured the "
                         f"student's ONNX FP32 at p50 {r['p50_ms']['student onnx fp32']:.3f} ms and INT8 at {r['p50_ms']['student onnx int8']:.3f} ms "
                         f"(teacher TorchScript/PyTorch {r['p50_ms']['teacher']:.3f} ms).")
    lines += ["", "## The built-in image student at 224×224", "", "| model | params | MACs |", "|---|---|---|"]
    for k, v in sizes.items():
        lines.append(f"| {k} | {v['params']:,} | {v['macs'] / 1e6:.1f}M |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="all")
    ap.add_argument("--work", default="runs/auto_bench")
    ap.add_argument("--results", default=str(HERE / "results" / "student_auto.md"))
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    work = Path(a.work)
    cases = _cases(work)
    names = list(cases) if a.cases == "all" else a.cases.split(",")
    rows = []
    for name in names:
        case = cases[name]
        if case["budget"] and "LAT" in case["budget"][0]:  # half the teacher's batch-1 FP32 latency measured on this host
            case = dict(case, budget=[f"latency_ms={_half_teacher_latency(case):.3f}"])
        print(f"== {name}", flush=True)
        rows.append(run_case(name, case, work))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("candidates", "export_check")}, default=str), flush=True)
    sizes = sizes_at_224()
    js = Path(a.results).with_suffix(".json")
    if a.cases != "all" and js.exists():  # a subset: the other cases' rows stay as they were
        ran = {r["case"] for r in rows}
        rows = [r for r in json.loads(js.read_text())["rows"] if r["case"] not in ran] + rows
        rows.sort(key=lambda r: list(cases).index(r["case"]) if r["case"] in cases else len(cases))
    js.write_text(json.dumps({"rows": rows, "sizes_224": sizes}, indent=1, default=str) + "\n")
    Path(a.results).write_text(render(rows, sizes))
    print(Path(a.results).read_text())


def _half_teacher_latency(case: dict) -> float:
    """Half the teacher's ONNX Runtime FP32 batch-1 p50 on this host (1 thread), the way the budget is measured."""
    import numpy as np
    import torch

    import auto_task
    from compressor.distill.auto_student import Meter

    m = auto_task.build_teacher()
    m.load_state_dict(torch.load(case["teacher"], weights_only=True))
    from compressor.targets import get_target

    x = np.load(case["data"])["x"][:2]
    return 0.5 * Meter(get_target("cpu"), x, {}).latency(m.eval())


if __name__ == "__main__":
    main()
