"""The export stage: the trained student to ONNX FP32 (each exporter in turn), simplified, every graph checked
against PyTorch and against the target runtime's operator support."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import ExportConfig
from ..errors import CompressError
from ..log import say
from ..run import Run, skip_done


def export_stage(run: Run, force: bool) -> Run:
    """Export the trained student to ONNX FP32, simplify it (onnxslim), and check every graph against PyTorch."""
    import torch

    from .._io import atomic_path
    from .onnx_io import EXPORTER_LABELS, check_graph, export_onnx
    from .op_support import check_runtime_ops
    from .simplify import simplify_onnx

    if skip_done(run, "export", force):
        return run
    cfg = run.config.export
    out = run.path("student.onnx")
    with run.running("export"):
        student = run.load_trained("student", eager=run.trust)  # --trust: from its code; else built in, or its TorchScript copy
        names = [n for n, _ in student.named_modules()]
        opset = cfg.opset or run.target["runtime"]["onnx_opset"]
        x = run.data.x_test[: cfg.check_rows]
        with torch.inference_mode():
            ref = student(torch.from_numpy(x)).numpy()
        try:
            # every graph is built under a temporary name and renamed to student.onnx only once all its checks pass
            with atomic_path(out) as tmp:
                # each exporter in turn (TorchScript-based, then torch.export-based): the first graph that passes the
                # checker, strict shape inference, a dynamic batch and the numeric check against PyTorch is kept
                checks = []
                info = export_onnx(student, x, tmp, opset, verify=lambda path: checks.append(
                    onnx_check(path, ref, x, cfg, "export", "torch.onnx.export", opset, names)))
                opset = info["opset"]
                checks = [{**checks[-1], "tool": info["tool"], "exporter": info["exporter"], "rejected": info["rejected"]}]
                simplify = {"requested": cfg.simplify, "applied": False}
                if cfg.simplify:
                    simp = tmp.with_name(tmp.name + ".simplified.tmp")
                    try:
                        simplify.update(simplify_onnx(tmp, simp))
                        if simplify["applied"]:
                            check_graph(simp, f"simplified ({simplify['tool']})", rewrite=True)
                            checks.append(onnx_check(simp, ref, x, cfg, "simplify", simplify["tool"], opset, names))
                            os.replace(simp, tmp)
                        else:
                            say(f"export: simplification skipped, the exported graph is kept: {simplify['reason']}")
                    finally:
                        simp.unlink(missing_ok=True)
                runtime = check_runtime_ops(tmp, run.target, opset, names, produced_by=checks[-1]["transformation"])
        except CompressError as exc:
            out.unlink(missing_ok=True)  # a forced redo that fails leaves no student.onnx from an earlier export
            if isinstance(student, torch.jit.ScriptModule):  # the run's code-free copy; the code itself may export
                raise CompressError(exc.message, hint=(f"{exc.hint}; " if exc.hint else "") + "this was the student's TorchScript copy "
                                    "(later stages do not run code a run folder names): pass --trust to export it from its code, "
                                    "for a run folder you trust", kind=exc.kind) from None
            raise
    final = dict(checks[-1])
    # "check" is the shipped graph's (what the report shows); "checks" has one entry per transformation
    check = {k: final[k] for k in ("max_abs_diff", "agreement", "rows", "atol", "min_agreement")}
    check.update(opset=opset, transformation=final["transformation"], exporter=info["exporter"], exporter_tool=info["tool"],
                 exporters_rejected=info["rejected"])
    run.finish("export", {"onnx_fp32": "student.onnx"},
               {"opset": opset, "check": check, "checks": checks, "simplify": simplify, "runtime_ops": runtime})
    shape = f", {checks[0]['nodes']} -> {final['nodes']} nodes ({simplify['tool']})" if simplify["applied"] else ""
    say(f"export: student.onnx (opset {opset}{shape}, {EXPORTER_LABELS[info['exporter']]}), max abs diff {check['max_abs_diff']:.2e}, "
         f"agreement {check['agreement']:.4f}")
    for r in info["rejected"]:
        say(f"export: the {EXPORTER_LABELS[r['exporter']]} was not used: {r['reason']}")
    return run


def onnx_check(path: Path, ref: np.ndarray, x: np.ndarray, cfg: ExportConfig, transformation: str, tool: str, opset: int, names) -> dict:
    """Run one transformation's graph in ONNX Runtime against the PyTorch logits; a miss is a CompressError naming it."""
    import onnx

    from . import onnx_io
    from .op_support import explain_ort_failure

    try:
        session = onnx_io.make_session(path)
    except CompressError as exc:
        raise explain_ort_failure(exc, path, names, produced_by=transformation) from None
    res = onnx_io.compare(ref, onnx_io.run_session(session, x))
    res = {"transformation": transformation, "tool": tool, "nodes": len(onnx.load(str(path), load_external_data=False).graph.node),
           "checker": "pass", "max_abs_diff": res["max_abs_diff"], "agreement": res["agreement"], "rows": res["rows"],
           "atol": cfg.atol, "min_agreement": cfg.min_agreement}
    res["passed"] = res["max_abs_diff"] <= cfg.atol and res["agreement"] >= cfg.min_agreement
    if not res["passed"]:
        what = "ONNX export" if transformation == "export" else f"the {transformation} step ({tool})"
        raise CompressError(
            f"{what} differs from PyTorch: max abs diff {res['max_abs_diff']:.2e} (tolerance {cfg.atol:.0e}), "
            f"argmax agreement {res['agreement']:.4f} (needs {cfg.min_agreement})",
            hint="an operation exports with different semantics; try another --opset" if transformation == "export"
            else "rerun 'compress export' with --no-simplify", kind="runtime")
    return res
