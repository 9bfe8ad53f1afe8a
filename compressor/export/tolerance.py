"""Choosing the INT8 model: every candidate recipe built and measured on this CPU, the fastest within the accuracy
tolerance kept; when none is, the most sensitive nodes are kept in float one at a time until it is (accuracy-aware
quantization), and when even that fails the caller may fine-tune the student with fake quantization and try again."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bench.latency import measure
from .onnx_io import compare, make_session, run_session
from .quantize import get_recipe, qdq_summary, quantize_with, sensitivity


@dataclass
class Validation:
    """The rows INT8 is judged on: labeled training rows the calibration did not use (accuracy against the labels), or,
    without enough labels, unseen rows judged by agreement with the FP32 model."""

    x: np.ndarray
    y: np.ndarray | None
    ref: np.ndarray  # FP32 logits on x

    @property
    def metric(self) -> str:
        return "accuracy" if self.y is not None else "agreement with FP32"

    def fp32_score(self) -> float:
        return float(np.mean(self.ref.argmax(1) == self.y)) if self.y is not None else 1.0

    def score(self, logits: np.ndarray) -> float:
        return float(np.mean(logits.argmax(1) == (self.y if self.y is not None else self.ref.argmax(1))))


def _p50(path: Path, one: np.ndarray) -> float:
    from .onnx_io import input_dtype

    sess = make_session(path, threads=1)
    name, dtype = sess.get_inputs()[0].name, input_dtype(sess)
    one = one.astype(dtype) if dtype is not None else one  # an FP16 model with float16 I/O is fed float16
    return measure(lambda: sess.run(None, {name: one}), min_runs=100, min_duration_s=0.3)["p50"]


def _retime(trials: list[dict], one: np.ndarray, rounds: int = 4) -> None:
    """Time the candidates again in interleaved rounds and keep each one's best p50: at tens of microseconds a single
    measurement is at the mercy of whatever else the machine did at that moment, and such disturbances only ever add time."""
    from .onnx_io import input_dtype

    sessions = [make_session(t["path"], threads=1) for t in trials]
    name = sessions[0].get_inputs()[0].name
    assert all(input_dtype(s) is None for s in sessions), "INT8 candidates take float32"
    p50s = [[t["p50_ms_1thread"]] for t in trials]
    for _ in range(rounds - 1):
        for sess, acc in zip(sessions, p50s):
            acc.append(measure(lambda: sess.run(None, {name: one}), warmup_ms=20, min_runs=100, min_duration_s=0.15)["p50"])
    for t, acc in zip(trials, p50s):
        t["p50_ms_1thread"] = float(np.min(acc))


def evaluate(path: Path, val: Validation, fp32_score: float, recipe: str | None = None, logits: np.ndarray | None = None) -> dict:
    """Accuracy (or agreement), its drop in points against FP32, agreement with FP32, batch-1 p50 on one thread.
    A graph of the tensorrt recipe is judged with the Q/DQ arithmetic emulated (make_session's emulate_qdq): its
    accuracy is the device's, not that of this CPU's integer kernels. logits: the graph's outputs on val.x when the
    caller has them already (the FP32 graph's are val.ref)."""
    if logits is None:
        logits = run_session(make_session(path, threads=None, emulate_qdq=recipe == "tensorrt"), val.x)
    cmp = compare(val.ref, logits)
    score = val.score(logits)
    ops = qdq_summary(path)
    return {"score": score, "drop_points": round(100.0 * (fp32_score - score), 4), "agreement_with_fp32": cmp["agreement"],
            "max_abs_diff": cmp["max_abs_diff"], "p50_ms_1thread": _p50(path, val.x[:1]), "ops_int8": ops["int8"], "ops_float": ops["float"]}


def choose_int8(fp32: Path, pre: Path, candidates: list[str], calib: np.ndarray, val: Validation, cfg, workdir: Path, say=print) -> dict:
    """Build every candidate, keep the fastest within cfg.int8_tolerance; else run the accuracy-aware search on the most
    accurate static candidate. Returns the chosen trial (with "path") plus "trials", "kept_float" and "search"."""
    fp32_score = val.fp32_score()
    trials = []
    for name in candidates:
        path = workdir / f"{name}.onnx"
        info = quantize_with(get_recipe(name), fp32, pre, path, calib, cfg.calibrate_method, cfg.per_channel, exclude=cfg.exclude_nodes)
        trials.append({"recipe": name, **evaluate(path, val, fp32_score, name), "fallback": info["fallback"], "path": path,
                       "kept_float": list(cfg.exclude_nodes or [])})
    if len(trials) > 1:
        _retime(trials, val.x[:1])
    ok = [t for t in trials if t["drop_points"] <= cfg.int8_tolerance]
    if ok:
        # the fastest, where faster means by more than 3%: otherwise the earlier candidate (the CPU's preferred recipe)
        best = ok[0]
        for t in ok[1:]:
            if t["p50_ms_1thread"] < 0.97 * best["p50_ms_1thread"]:
                best = t
        return {**best, "trials": trials, "search": None}
    static = [t for t in trials if get_recipe(t["recipe"]).kind == "static"] or trials
    base = max(static, key=lambda t: (t["score"], -t["p50_ms_1thread"]))
    best = {**base, "trials": trials, "search": None}
    if cfg.max_float_nodes <= 0 or get_recipe(base["recipe"]).kind != "static":
        return best
    say(f"quantize: INT8 loses {base['drop_points']:.2f} points of {val.metric} ({base['recipe']}), more than the "
        f"{cfg.int8_tolerance:g} allowed: keeping the most sensitive nodes in float")
    found = keep_sensitive_in_float(fp32, pre, base, calib, val, cfg, workdir, say)
    found["search"]["plain_p50_ms_1thread"] = base["p50_ms_1thread"]
    return {**found, "trials": trials}


def keep_sensitive_in_float(fp32: Path, pre: Path, base: dict, calib: np.ndarray, val: Validation, cfg, workdir: Path, say=print) -> dict:
    """Accuracy-aware quantization: rank the quantized nodes by the error they add (quantize.sensitivity), keep the worst in
    float, requantize, and repeat until the drop is within tolerance or cfg.max_float_nodes are in float. Returns the
    best attempt with "kept_float" and "search" (every round)."""
    fp32_score = val.fp32_score()
    recipe = get_recipe(base["recipe"])
    kept = list(base.get("kept_float") or [])
    current, rounds = base, []
    rows = val.x[: min(len(val.x), 512)]
    for i in range(cfg.max_float_nodes):
        ranking = [r for r in sensitivity(pre, current["path"], rows, emulate_qdq=recipe.name == "tensorrt") if r["node"] not in kept]
        if not ranking:
            break
        worst = ranking[0]
        kept.append(worst["node"])
        path = workdir / f"{recipe.name}-float{i + 1}.onnx"
        info = quantize_with(recipe, fp32, pre, path, calib, cfg.calibrate_method, cfg.per_channel, exclude=kept)
        current = {"recipe": recipe.name, **evaluate(path, val, fp32_score, recipe.name), "fallback": info["fallback"], "path": path, "kept_float": list(kept)}
        rounds.append({"kept_float": worst["node"], "op": worst["op"], "added_error": round(worst["added_error"], 6),
                       "drop_points": current["drop_points"], "p50_ms_1thread": current["p50_ms_1thread"]})
        say(f"quantize: kept {worst['node']} ({worst['op']}) in float: {val.metric} drop {current['drop_points']:.2f} points")
        if current["drop_points"] <= cfg.int8_tolerance:
            break
    best = min([base] + [current], key=lambda t: (t["drop_points"] > cfg.int8_tolerance, t["drop_points"]))
    if best is base:
        kept_nodes = list(base.get("kept_float") or [])
    else:
        kept_nodes = best["kept_float"]
    ops = {}
    if kept_nodes:
        import onnx

        by_name = {n.name: n.op_type for n in onnx.load(str(pre), load_external_data=False).graph.node}
        ops = {n: by_name.get(n, "?") for n in kept_nodes}
    return {**best, "kept_float": kept_nodes, "kept_float_ops": ops,
            "search": {"rounds": rounds, "within_tolerance": best["drop_points"] <= cfg.int8_tolerance}}
