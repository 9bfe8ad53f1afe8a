"""The quantize stage: INT8 (and, where the target takes it, FP16) flavours of the ONNX student, each judged on a
validation split against FP32 (tolerance.py); the recipes and their tools are in quantize.py and recipes.py."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..log import say
from ..run import Run, skip_done


def quantize_stage(run: Run, force: bool) -> Run:
    """INT8 (and, where the target takes it, FP16) flavours of the ONNX student. INT8: every candidate recipe of the
    target's is calibrated on the user's rows, judged on a validation split and timed on this CPU; the fastest within
    --int8-tolerance wins. When none is within it, the most sensitive nodes are kept in float until it is, and when even
    that fails, the student is fine-tuned with fake quantization against the teacher (quantization-aware distillation)."""
    from ..bench.host import has_vnni
    from .onnx_io import make_session, run_session
    from .quantize import auto_candidates, get_recipe, preprocess, scratch_dir, to_fp16
    from .tolerance import Validation, choose_int8, evaluate

    if skip_done(run, "quantize", force):
        return run
    cfg = run.config.quantize
    fp32 = run.path(run.stage("export")["outputs"]["onnx_fp32"])
    ds = run.data
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(ds.x))
    n_cal = min(cfg.calibration_rows, max(1, len(order) // 2))  # a small pool keeps half its rows for validation
    calib = ds.x[order[:n_cal]]
    # The validation split INT8 is judged on: labeled training rows the calibration did not use (never the held-out set).
    rest = order[n_cal:]
    labeled = rest[ds.y[rest] >= 0][: cfg.validation_rows]
    recipe_name = cfg.recipe if cfg.recipe != "auto" else run.target["quantization"]["int8_recipe"]
    candidates = auto_candidates(recipe_name, fp32, has_vnni())
    want_fp16 = cfg.fp16 if cfg.fp16 is not None else "fp16" in run.target["quantization"].get("precisions", [])
    out = run.path("student.int8.onnx")
    outputs = {"onnx_int8": "student.int8.onnx"}
    with run.running("quantize"):
        fp32_sess = make_session(fp32, threads=None)
        if len(labeled) >= 100:
            vx, vy = ds.x[labeled], ds.y[labeled]
        else:  # too few labels: judge by agreement with FP32 on unseen rows
            vx, vy = (ds.x[rest[: cfg.validation_rows]] if len(rest) else calib), None
        val = Validation(vx, vy, run_session(fp32_sess, vx))
        with scratch_dir(run.dir) as tmp:
            pre = Path(tmp) / "pre.onnx"
            preprocess(fp32, pre)
            fp32_eval = evaluate(fp32, val, val.fp32_score(), logits=val.ref)  # FP32's outputs on the rows: computed once, above
            chosen = choose_int8(fp32, pre, candidates, calib, val, cfg, Path(tmp), say=say)
            qat = None
            if chosen["drop_points"] > cfg.int8_tolerance and cfg.qat_steps > 0:
                from ..distill.qat import quantization_aware_distill

                qat, qat_trial = quantization_aware_distill(run, chosen, calib, val, cfg, Path(tmp), say=say)
                if qat_trial is not None and qat_trial["drop_points"] < chosen["drop_points"]:
                    chosen = {**qat_trial, "trials": chosen["trials"], "search": chosen.get("search")}
            os.replace(chosen["path"], out)
            fp16 = None
            if want_fp16:
                fp16_path = run.path("student.fp16.onnx")
                info = to_fp16(fp32, fp16_path, cfg.keep_io_fp32)
                fp16 = {**evaluate(fp16_path, val, val.fp32_score()), "keep_io_fp32": info["keep_io_fp32"]}
                outputs["onnx_fp16"] = "student.fp16.onnx"
        trials = [{k: v for k, v in t.items() if k != "path"} for t in chosen["trials"]]
    recipe = get_recipe(chosen["recipe"])
    result = {"recipe": chosen["recipe"], "description": recipe.description, "requested": recipe_name,
              "calibration_rows": int(len(calib)), "calibrate_method": cfg.calibrate_method, "per_channel": cfg.per_channel,
              "agreement_with_fp32": chosen["agreement_with_fp32"], "fp32_p50_ms_1thread": fp32_eval["p50_ms_1thread"],
              "p50_ms_1thread": chosen["p50_ms_1thread"],
              "validation": {"rows": int(len(val.x)), "metric": val.metric, "fp32": val.fp32_score(), "int8": chosen["score"]},
              "int8_tolerance": cfg.int8_tolerance, "drop_points": chosen["drop_points"],
              "within_tolerance": chosen["drop_points"] <= cfg.int8_tolerance,
              "kept_float": [{"node": n, "op": op} for n, op in (chosen.get("kept_float_ops") or {n: "?" for n in chosen.get("kept_float") or []}).items()],
              "accuracy_aware": chosen.get("search"), "qat": qat,
              "kept_float_cost_ms": (round(chosen["p50_ms_1thread"] - chosen["search"]["plain_p50_ms_1thread"], 5)
                                     if chosen.get("search") and chosen.get("kept_float") else None),
              "ops_int8": chosen["ops_int8"], "ops_float": chosen["ops_float"], "fallback": chosen["fallback"], "trials": trials,
              "fp16": fp16}
    run.finish("quantize", outputs, result)
    say(f"quantize: {chosen['recipe']} -> student.int8.onnx, {val.metric} {chosen['score'] * 100:.2f}% vs FP32 "
         f"{val.fp32_score() * 100:.2f}% on {len(val.x)} validation rows; {chosen['p50_ms_1thread']:.3f} vs "
         f"{fp32_eval['p50_ms_1thread']:.3f} ms FP32 (batch 1, 1 thread)")
    if result["kept_float"]:
        say("quantize: kept in float to stay within tolerance: " + ", ".join(f"{k['node']} ({k['op']})" for k in result["kept_float"]))
    if not result["within_tolerance"]:
        say(f"quantize: INT8 still loses {chosen['drop_points']:.2f} points (tolerance {cfg.int8_tolerance:g}): ship FP32"
             + (" or FP16" if fp16 else "") + " for accuracy")
    if chosen["ops_float"]:
        say(f"quantize: left in float (not quantized by the {chosen['recipe']} recipe): {op_counts(chosen['ops_float'])}")
    if chosen["fallback"]:
        say(f"quantize: {chosen['fallback']}")
    if fp16:
        say(f"quantize: fp16 -> student.fp16.onnx, {val.metric} {fp16['score'] * 100:.2f}%")
    return run


def op_counts(ops: dict) -> str:
    return ", ".join(f"{op} ×{n}" for op, n in ops.items())
