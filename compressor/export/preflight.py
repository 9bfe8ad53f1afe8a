"""Preflight: every check the export and quantize stages make that an untrained student can already fail, run before
the first training step (and before the teacher's pass over the pool), so a student that cannot ship costs seconds,
not an hour of training. It builds nothing in the run directory: the graphs live in a temporary folder."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import CompressError


def preflight(student, x: np.ndarray, target: dict, opset: int | None = None, recipe: str = "auto") -> dict:
    """Export the (untrained) student through the export stage's exporter chain with its numeric check, check the ops
    against the target's runtime, and build the INT8 model of the target's recipe (calibrated on x: only whether every
    op is accepted matters here, and for TensorRT whether the Q/DQ placement follows its rules). Returns what was
    checked; a failure is the stage's own one-line error, plus 'nothing was trained'."""
    import torch

    from ..bench.host import has_vnni
    from .onnx_io import compare, export_onnx, make_session, run_session
    from .op_support import check_runtime_ops, explain_ort_failure
    from .quantize import auto_candidates, get_recipe, preprocess, quantize_with

    t0 = time.perf_counter()
    x = np.ascontiguousarray(x[: max(3, min(len(x), 8))])
    if len(x) < 3:
        x = np.ascontiguousarray(np.resize(x, (3,) + x.shape[1:]))  # a batch other than the export's 2 rows
    names = [n for n, _ in student.named_modules()]
    opset = opset or target["runtime"]["onnx_opset"]
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            ref = student(torch.from_numpy(x)).float().numpy()
        with tempfile.TemporaryDirectory(prefix="compressor-preflight-") as d:
            fp32 = Path(d) / "student.onnx"

            def verify(path: Path) -> None:
                try:
                    sess = make_session(path)
                except CompressError as exc:
                    raise explain_ort_failure(exc, path, names) from None
                res = compare(ref, run_session(sess, x))  # a batch other than the export's: export_onnx explains a failure
                scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
                if res["max_abs_diff"] > 1e-3 * scale:
                    raise CompressError(f"the exported graph differs from PyTorch by {res['max_abs_diff']:.2e} on the untrained student",
                                        hint="an operation exports with different semantics; try another --opset", kind="runtime")

            info = export_onnx(student, x, fp32, opset, verify=verify, optimize=False)
            runtime = check_runtime_ops(fp32, target, info["opset"], names)
            name = recipe if recipe != "auto" else target["quantization"]["int8_recipe"]
            candidate = auto_candidates(name, fp32, has_vnni())[0]  # the one the CPU prefers; the stage tries the rest
            pre, q = Path(d) / "pre.onnx", Path(d) / "int8.onnx"
            preprocess(fp32, pre)
            qinfo = quantize_with(get_recipe(candidate), fp32, pre, q, x)  # TensorRT recipes: the Q/DQ rule check inside
            try:
                out = run_session(make_session(q), x)
            except CompressError as exc:
                raise explain_ort_failure(exc, q, names, produced_by=f"INT8 ({candidate})") from None
            if out.shape != ref.shape:
                raise CompressError(f"the INT8 graph returns shape {out.shape[1:]}, not {ref.shape[1:]}", kind="runtime")
    except CompressError as exc:
        raise CompressError(f"preflight: {exc.message}; nothing was trained", hint=exc.hint or "fix the student, or pass --skip-preflight",
                            kind=exc.kind) from None
    finally:
        student.train(was_training)
    return {"seconds": round(time.perf_counter() - t0, 2), "exporter": info["exporter"], "opset": info["opset"],
            "rejected": info["rejected"], "runtime_ops": runtime.get("method"), "recipe": candidate, "fallback": qinfo.get("fallback")}
