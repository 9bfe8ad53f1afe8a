"""A run folder is data: what the distill stage saves so that later stages never run code the run folder names
(Run.teacher, Run.load_trained): TorchScript copies of trained modules built by code and of a teacher that came as
code, the teacher's class for each held-out row, its input shape, and a black box's bench row."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..log import say


def save_code_free(run, outputs: dict, results: dict) -> tuple[dict, dict]:
    """A run folder is data: later stages never run code it names (Run.teacher, Run.load_trained). So the distill
    stage saves what they need in forms that load without running Python code: a TorchScript copy of each trained
    module built by code (a factory, or cut from the teacher) and of a teacher that came as code (a state dict with
    --teacher-arch, a --trust pickle), each checked to give the original's outputs; the teacher's class for each
    held-out row (teacher_heldout.npz); the teacher's input shape; and for a black box (a callable or a command) its
    bench row, since it is never queried again."""
    import json

    from .._io import atomic_path, is_writer, sha256_json
    from ..run import COPY_SUFFIX, TEACHER_COPY, TEACHER_HELDOUT

    teacher, ds = run.teacher, run.data
    shape = teacher.input_shape
    results["teacher_input_shape"] = None if shape is None else [d if isinstance(d, int) else None for d in shape]
    if not is_writer():  # under torchrun only rank 0 writes
        return outputs, results
    copies = {}
    # a built-in student is rebuilt from its spec (no user code): only a student built by code gets a copy
    coded = not str(results["student_record"].get("spec", "")).startswith("builtin:")
    jobs = [(name, f"{name}_torchscript", f"{name}{COPY_SUFFIX}") for name in ("student", "baseline") if name in outputs and coded]
    if teacher.format in ("state_dict", "pickle"):
        jobs.append(("teacher", "teacher_torchscript", TEACHER_COPY))
    for name, key, filename in jobs:
        module = teacher.to("cpu").module if name == "teacher" else run.rebuild_trained(name, results["student_record"], results["num_classes"])
        why = torchscript_copy(module, ds, run.path(filename))
        copies[name] = filename if why is None else f"none: {why}"
        if why is None:
            outputs[key] = filename
        else:
            say(f"distill: no code-free copy of the {name} ({why}); later stages need --trust to rebuild it from its code")
    bcfg = run.config.bench
    blackbox = hasattr(teacher, "answers")
    path = run.path(TEACHER_HELDOUT)
    # a rerun with the same teacher and data reuses the answers: a black box's calls may cost money
    key = sha256_json([run.manifest["inputs"], run.config.data.to_dict(), results["num_classes"], blackbox])
    cached = read_heldout(path, key, len(ds.y_test))
    if cached is not None:
        pred, row = cached
        queries = {"rows": 0, "calls": 0, "cached": True}
    elif blackbox:  # measured once, here, the way bench measures a black box (runner_bench.teacher_row)
        from ..bench.runner_bench import teacher_row

        rows0, calls0 = teacher.rows, teacher.calls
        row, pred, _, _ = teacher_row(run, teacher, bcfg, results["num_classes"])
        queries = {"rows": teacher.rows - rows0, "calls": teacher.calls - calls0, "cached": False}
    else:
        from .teacher_pass import heldout_classes

        pred, row = heldout_classes(run, teacher, ds), None
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, pred=np.asarray(pred, np.int64), key=np.array(key), row=np.array(json.dumps(row)))
    outputs["teacher_heldout"] = TEACHER_HELDOUT
    results["code_free"] = {**copies, "teacher_heldout": TEACHER_HELDOUT}
    if blackbox:
        results["teacher_row"] = row
        results["teacher_heldout_queries"] = queries
    return outputs, results


def read_heldout(path: Path, key: str, rows: int):
    """(pred, row) from an earlier teacher_heldout.npz written for the same key, or None."""
    import json

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key or z["pred"].shape != (rows,):
                return None
            return z["pred"].astype(np.int64), json.loads(str(z["row"]))
    except (OSError, ValueError, KeyError):
        return None


def torchscript_copy(module, ds, path: Path) -> str | None:
    """Save a TorchScript copy of module at path (traced, else scripted) that gives its outputs on batches of other sizes
    than the trace's; None when saved, else why not."""
    import torch

    from .._io import atomic_path

    module = module.eval().cpu()
    x = np.ascontiguousarray(ds.x[:4])
    checks = [np.ascontiguousarray(a) for a in (ds.x[:1], ds.x[:3], ds.x_test[:64]) if len(a)]

    def first(y):
        return y[0] if isinstance(y, (tuple, list)) else y

    def same(copy) -> str | None:
        with torch.no_grad():
            for xb in checks:
                ref, got = first(module(torch.from_numpy(xb))), first(copy(torch.from_numpy(xb)))
                if not (isinstance(got, torch.Tensor) and got.shape == ref.shape):
                    return f"it returns {tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__} on a batch of {len(xb)}"
                atol = 1e-4 * max(1.0, float(ref.abs().max()))
                if not torch.allclose(got.float(), ref.float(), rtol=1e-3, atol=atol):
                    return f"its outputs differ by up to {float((got.float() - ref.float()).abs().max()):.3g} on a batch of {len(xb)}"
        return None

    reasons = []
    for how in ("trace", "script"):
        try:
            import warnings

            fastpath = torch.backends.mha.get_fastpath_enabled()
            # without the fused attention fast path: a trace would record its aten::_transformer_encoder_layer_fwd,
            # which no ONNX exporter knows (the exporters, given the module, take the plain path too)
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    copy = (torch.jit.trace(module, torch.from_numpy(x), check_trace=False, strict=False) if how == "trace"
                            else torch.jit.script(module))
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
            why = same(copy)
            if why is None:
                with atomic_path(path) as tmp:
                    torch.jit.save(copy, str(tmp))
                why = same(torch.jit.load(str(path), map_location="cpu").eval())  # what later stages will load
            if why is None:
                return None
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        reasons.append(f"{how}: {why}")
        path.unlink(missing_ok=True)
    return "; ".join(reasons)
