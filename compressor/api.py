"""The public entry points: one function per stage, each taking one config dataclass, plus compress()
for the whole pipeline. The CLI only parses arguments and calls these."""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np

from ._io import torch_save, write_json
from .config import BenchConfig, CompressConfig, ExportConfig, QuantizeConfig
from .errors import CompressError
from .run import Run

log = logging.getLogger("compressor")


def _say(msg: str) -> None:
    log.info(msg)


def _open_stage(run_dir, stage: str, config, force: bool, trust: bool = False) -> tuple[Run, bool]:
    """Open a run for one stage with its (optionally changed) config; True when the stage is already done.
    trust: the stage may run code the run folder names when it has no code-free copy of it (Run.trust)."""
    run = Run.open(run_dir)
    run.trust = trust
    if config is not None:
        run.set_stage_config(stage, config)
    return run, _skip(run, stage, force)


def _locked(fn):
    """Hold the run folder's lock (compressor.ownership.run_lock) for the whole stage: a second writer is refused."""
    @functools.wraps(fn)
    def wrapper(run_dir, *args, **kw):
        from .ownership import run_lock

        with run_lock(run_dir):
            return fn(run_dir, *args, **kw)
    return wrapper


def claim_out(cfg: CompressConfig, out) -> Path:
    """--out (or a new runs/<timestamp>) as this run's folder: new, empty, or a run folder already; never the data's."""
    from .models._blackbox_teacher import is_query_spec
    from .ownership import claim_run_dir
    from .run import default_run_dir

    # a missing teacher or data file is refused before --out is made: a typo leaves no folder behind
    t = cfg.teacher
    if t is not None and not is_query_spec(t) and not Path(t).is_file():
        raise CompressError(f"teacher {t} does not exist" if not Path(t).exists() else f"teacher {t} is not a file")
    if cfg.data.source != "mnist1d" and not Path(cfg.data.source).exists():
        raise CompressError(f"data {cfg.data.source} does not exist", hint="pass an .npz file, an image folder, or 'mnist1d'")
    return claim_run_dir(Path(out) if out else default_run_dir(), (cfg.data.source, cfg.data.eval_source))


def _skip(run: Run, stage: str, force: bool) -> bool:
    if not force and run.is_done(stage):
        _say(f"{stage}: already done in {run.dir} (use --force to redo)")
        return True
    return False


# ---------------------------------------------------------------------------------------------
def distill(cfg: CompressConfig, out: str | Path | None = None, *, force: bool = False, resume: bool = False) -> Run:
    """Train the student from the teacher (and the labels-only baseline when cfg.distill.baseline)."""
    from .ownership import run_lock

    path = claim_out(cfg, out)
    with run_lock(path):
        return _distill_locked(cfg, path, force, resume)


def _distill_locked(cfg: CompressConfig, path: Path, force: bool, resume: bool) -> Run:
    run = Run.create(path, cfg)
    run.live = True  # the teacher and the student come from this command line: their code may run (see Run.teacher)
    if _skip(run, "distill", force):
        return run
    prev = run.manifest["stages"].get("distill", {})
    if resume and prev.get("fingerprint") not in (None, run.fingerprint("distill")):
        raise CompressError("--resume: the inputs or settings differ from the interrupted run", hint="rerun with the original command, or --force to start over")
    from .distill.trainer import _dist_info

    if run.config.distill.nproc_per_node > 1 and _dist_info()[1] == 1:
        from .distill.ddp import launch

        launch(run.dir, run.config.distill.nproc_per_node, resume)
        return Run.open(run.dir)
    with run.running("distill"):
        _check_teacher_student(run)
        outputs, results = _distill(run, resume)
    run.finish("distill", outputs, results)
    return run


def _distill(run: Run, resume: bool) -> tuple[dict, dict]:
    import torch

    from .data import stratified_split
    from .distill.trainer import budget_steps, train_student
    from .models import build_student

    dcfg = run.config.distill
    from .distill import blackbox

    if blackbox.wanted(dcfg, run.config.teacher):  # a budget, non-logits answers, or a callable/command teacher
        return _save_code_free(run, *blackbox.distill_blackbox(run, resume))
    teacher, ds = run.teacher, run.data
    probe = teacher.logits(ds.x[:2])
    run.check_data_fits_teacher(probe)
    num_classes = probe.shape[1]

    teacher_params = teacher.num_params()
    # 'teacher:…' students are cut from the teacher; token-id data sizes the built-in student's embedding
    student_ctx = {"teacher": teacher, "vocab_size": _vocab_size(teacher, ds) if ds.token_ids else None}
    from .models.outputs import logits_only

    torch.manual_seed(dcfg.seed)
    student, record = logits_only(*build_student(dcfg.student, ds.input_shape, num_classes, teacher_params, **student_ctx), ds.x[:2], dcfg.output)
    _check_student_output(student, ds.x[:2], num_classes, dcfg.student)
    preflight = None
    from ._io import is_writer

    if run.config.preflight and is_writer():  # every check later stages make that an untrained student can fail (rank 0 only)
        from .export.preflight import preflight as run_preflight

        preflight = run_preflight(student, ds.x[:8], run.target, run.config.export.opset, run.config.quantize.recipe)
        _say(f"preflight: the student exports ({preflight['exporter']}, opset {preflight['opset']}), matches PyTorch and "
             f"quantizes ({preflight['recipe']}) in {preflight['seconds']:.1f} s")
    # Function matching and hints need the teacher on every (augmented) batch; otherwise its outputs for the
    # whole pool are computed once, cached in the run directory and memory-mapped by later runs and --resume.
    from .models.outputs import output_note, resolve_teacher_output

    # logits or probabilities (--teacher-output, else detected on a sample): probabilities are read as their log from here on
    teacher_output = resolve_teacher_output(teacher, ds.x, dcfg.teacher_output)
    online = _teacher_online(dcfg)
    pool_logits, teacher_seconds = (None, 0.0) if online else _teacher_pool_logits(run, teacher, ds, dcfg)

    # Validation rows come out of the labeled training rows (never the held-out set).
    labeled = np.flatnonzero(ds.y >= 0)
    keep, val = stratified_split(ds.y, dcfg.val_fraction, dcfg.seed)
    if len(val) == 0:
        raise CompressError("too few labeled rows to carve out a validation split", hint="label more rows (each class needs at least 2 labeled rows)")
    train_rows = np.setdiff1d(np.arange(len(ds.y)), val)
    x_val, y_val = ds.x[val], ds.y[val]
    steps = budget_steps(dcfg, len(train_rows))
    ckdir = run.path("checkpoints")

    results, outputs = {}, {}
    scfg = dcfg  # the student's settings; with --search, the best trial's (the baseline keeps dcfg's)
    if dcfg.search > 0:
        from .distill.search import search_for_distill

        best, results["search"] = search_for_distill(run, dcfg, teacher, ds, train_rows, x_val, y_val, pool_logits,
                                                     lambda: logits_only(*build_student(dcfg.student, ds.input_shape, num_classes, teacher_params,
                                                                                        **student_ctx), ds.x[:2], dcfg.output)[0],
                                                     full_steps=steps, resume=resume)
        scfg = dcfg.replace(**best)
        online = _teacher_online(scfg)
        if not online and pool_logits is None:
            pool_logits, teacher_seconds = _teacher_pool_logits(run, teacher, ds, dcfg)
    jobs = [("student", scfg.loss, train_rows, None if online else pool_logits[train_rows])]
    if dcfg.baseline:
        jobs.append(("baseline", "labels", np.intersect1d(train_rows, labeled), None))
    for name, loss, rows, tlogits in jobs:
        torch.manual_seed(dcfg.seed)
        module, _ = logits_only(*build_student(dcfg.student, ds.input_shape, num_classes, teacher_params, **student_ctx), ds.x[:2], dcfg.output)
        kw = {}
        if online and name == "student":
            kw = _online_teacher(teacher, module, ds.x[:2], scfg)
        jcfg = scfg if name == "student" else dcfg.replace(augment="none", mixup=0.0, cutmix=0.0, hint=None)
        _say(f"distill: training {name} ({loss}{', teacher online' if kw else ''}) for {steps} steps on {len(rows)} rows")
        module, res = train_student(module, ds.x[rows], ds.y[rows], tlogits, x_val, y_val, jcfg, steps=steps,
                                    checkpoint=ckdir / f"{name}.ckpt", label=name, resume=resume, loss_name=loss, **kw)
        if kw.get("hint") is not None:
            kw["hint"].remove()
        teacher.to("cpu")
        torch_save(module.state_dict(), run.path(f"{name}.pt"))
        outputs[name] = f"{name}.pt"
        results[name] = {"loss": loss, "val_accuracy": res.best_val_accuracy, "best_step": res.best_step, "steps": res.steps,
                         "seconds": round(res.seconds, 2), "steps_per_second": round(res.steps / max(res.seconds, 1e-9), 2),
                         "resumed_from_step": res.resumed_from, "train_rows": int(len(rows)), "history": res.history}
    results["teacher_pass_seconds"] = round(teacher_seconds or 0.0, 3)
    results["teacher_pass"] = "online" if online else "cached" if teacher_seconds is None else "computed"
    results["teacher_online"] = online
    results["teacher_output"] = teacher_output
    results["notes"] = [n for n in [output_note(teacher_output)] if n]  # bench/report.py adds them to the report's notes
    results.update(student_record=record, num_classes=num_classes, preflight=preflight, val_rows=int(len(val)), params=int(sum(p.numel() for p in student.parameters())),
                   teacher_params=teacher_params, teacher_format=teacher.format, data=ds.summary())
    return _save_code_free(run, outputs, results)


def _save_code_free(run: Run, outputs: dict, results: dict) -> tuple[dict, dict]:
    """A run folder is data: later stages never run code it names (Run.teacher, Run.load_trained). So the distill
    stage saves what they need in forms that load without running Python code: a TorchScript copy of each trained
    module built by code (a factory, or cut from the teacher) and of a teacher that came as code (a state dict with
    --teacher-arch, a --trust pickle), each checked to give the original's outputs; the teacher's class for each
    held-out row (teacher_heldout.npz); the teacher's input shape; and for a black box (a callable or a command) its
    bench row, since it is never queried again."""
    import json

    from ._io import atomic_path, is_writer, sha256_json
    from .run import COPY_SUFFIX, TEACHER_COPY, TEACHER_HELDOUT

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
        module = teacher.to("cpu").module if name == "teacher" else run._rebuild_trained(name, results["student_record"], results["num_classes"])
        why = _torchscript_copy(module, ds, run.path(filename))
        copies[name] = filename if why is None else f"none: {why}"
        if why is None:
            outputs[key] = filename
        else:
            _say(f"distill: no code-free copy of the {name} ({why}); later stages need --trust to rebuild it from its code")
    bcfg = run.config.bench
    blackbox = hasattr(teacher, "answers")
    path = run.path(TEACHER_HELDOUT)
    # a rerun with the same teacher and data reuses the answers: a black box's calls may cost money
    key = sha256_json([run.manifest["inputs"], run.config.data.to_dict(), results["num_classes"], blackbox])
    cached = _read_heldout(path, key, len(ds.y_test))
    if cached is not None:
        pred, row = cached
        queries = {"rows": 0, "calls": 0, "cached": True}
    elif blackbox:  # measured once, here, the way bench measures a black box (runner_bench.teacher_row)
        from .bench.runner_bench import teacher_row

        rows0, calls0 = teacher.rows, teacher.calls
        row, pred, _, _ = teacher_row(run, teacher, bcfg, results["num_classes"])
        queries = {"rows": teacher.rows - rows0, "calls": teacher.calls - calls0, "cached": False}
    else:
        pred, row = teacher.to("cpu").logits(ds.x_test, batch_size=bcfg.eval_batch_size).argmax(1), None
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, pred=np.asarray(pred, np.int64), key=np.array(key), row=np.array(json.dumps(row)))
    outputs["teacher_heldout"] = TEACHER_HELDOUT
    results["code_free"] = {**copies, "teacher_heldout": TEACHER_HELDOUT}
    if blackbox:
        results["teacher_row"] = row
        results["teacher_heldout_queries"] = queries
    return outputs, results


def _read_heldout(path: Path, key: str, rows: int):
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


def _torchscript_copy(module, ds, path: Path) -> str | None:
    """Save a TorchScript copy of module at path (traced, else scripted) that gives its outputs on batches of other sizes
    than the trace's; None when saved, else why not."""
    import torch

    from ._io import atomic_path

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


def _teacher_online(dcfg) -> bool:
    """Function matching, mixing and hints need the teacher run on every batch (no cached outputs)."""
    return dcfg.augment != "none" or dcfg.mixup > 0 or dcfg.cutmix > 0 or bool(dcfg.hint)


def _teacher_pool_logits(run: Run, teacher, ds, dcfg) -> tuple[np.ndarray, float]:
    """The teacher's outputs for every pool row: from the run's cache when its key matches, else computed and cached."""
    import time

    from ._io import atomic_path, write_text
    from .distill.trainer import pick_device

    from ._io import sha256_json

    cache = run.path("cache/teacher_pool_logits.npy")
    # the outputs depend on the teacher, the data and how its outputs are read (--teacher-output) only: a rerun with
    # another loss, T or schedule reuses them
    key = sha256_json([run.manifest["inputs"], run.config.data.to_dict(), dcfg.teacher_output])
    key_file = cache.with_suffix(".key")
    if cache.exists() and key_file.exists() and key_file.read_text() == key:
        return np.load(cache, mmap_mode="r"), None
    from .models.outputs import resolve_teacher_output

    resolve_teacher_output(teacher, ds.x, dcfg.teacher_output)  # done once per teacher (already, in the distill stage)
    _say(f"distill: running the teacher ({teacher.format}) on {len(ds.x)} training rows")
    t0 = time.perf_counter()
    pool_logits = teacher.to(pick_device(dcfg.device)).logits(ds.x, batch_size=4 * dcfg.batch_size)
    seconds = time.perf_counter() - t0
    teacher.to("cpu")
    bad = ~np.isfinite(pool_logits).all(axis=1)
    if bad.any():
        raise CompressError(f"the teacher returns NaN or Inf for {int(bad.sum())} of {len(bad)} training rows (first: row {int(np.argmax(bad))})",
                            hint="check the data's scale and preprocessing: it should match what the teacher was trained on")
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, pool_logits)
    write_text(key_file, key)
    return pool_logits, seconds


def _online_teacher(teacher, student, sample: np.ndarray, dcfg) -> dict:
    """train_student's keyword arguments for a teacher run on every batch (and the hint, if asked)."""
    import torch

    from .distill.trainer import OnlineTeacher, pick_device

    device = pick_device(dcfg.device)
    teacher.to(device)
    if teacher.white_box and hasattr(teacher.module, "eval"):
        teacher.module.eval()
    kw = {"online_teacher": OnlineTeacher(teacher, device)}
    if dcfg.hint:
        from .distill.losses.hint import Hint

        kw["hint"] = Hint(dcfg.hint, student, teacher, torch.from_numpy(sample))
    return kw


def _check_teacher_student(run: Run) -> None:
    """A student cut from the teacher ('teacher:every-other') fails here, before the teacher's pass over the pool."""
    spec = run.config.distill.student
    if spec and spec.startswith("teacher:"):
        from .models.student import from_teacher

        from_teacher(spec, run.teacher)


def _vocab_size(teacher, ds) -> int:
    """Embedding rows a token-id student needs: every id in the data, and the teacher's own vocabulary when it shows one."""
    size = int(max(ds.x.max(initial=0), ds.x_test.max(initial=0))) + 1
    module = teacher.module if teacher.format in ("state_dict", "pickle") else None
    if module is not None and hasattr(module, "modules"):
        import torch

        emb = next((m for m in module.modules() if isinstance(m, torch.nn.Embedding)), None)
        if emb is not None:
            size = max(size, int(emb.num_embeddings))
    return size


def _check_student_output(student, x: np.ndarray, num_classes: int, spec) -> None:
    import torch

    try:
        with torch.no_grad():
            y = student.eval()(torch.from_numpy(x))
    except Exception as exc:
        raise CompressError(f"the student ({spec or 'default'}) cannot run on data of shape {x.shape[1:]}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (len(x), num_classes):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CompressError(f"the student ({spec or 'default'}) returns {shape}; expected (batch, {num_classes}) class scores like the teacher")


# ---------------------------------------------------------------------------------------------
@_locked
def export(run_dir: str | Path, config: ExportConfig | None = None, *, force: bool = False, trust: bool = False) -> Run:
    """Export the trained student to ONNX FP32, simplify it (onnxslim), and check every graph against PyTorch."""
    import torch

    from ._io import atomic_path
    from .export.onnx_io import EXPORTER_LABELS, check_graph, export_onnx
    from .export.op_support import check_runtime_ops
    from .export.simplify import simplify_onnx

    run, done = _open_stage(run_dir, "export", config, force, trust)
    if done:
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
                    _onnx_check(path, ref, x, cfg, "export", "torch.onnx.export", opset, names)))
                opset = info["opset"]
                checks = [{**checks[-1], "tool": info["tool"], "exporter": info["exporter"], "rejected": info["rejected"]}]
                simplify = {"requested": cfg.simplify, "applied": False}
                if cfg.simplify:
                    simp = tmp.with_name(tmp.name + ".simplified.tmp")
                    try:
                        simplify.update(simplify_onnx(tmp, simp))
                        if simplify["applied"]:
                            check_graph(simp, f"simplified ({simplify['tool']})", rewrite=True)
                            checks.append(_onnx_check(simp, ref, x, cfg, "simplify", simplify["tool"], opset, names))
                            os.replace(simp, tmp)
                        else:
                            _say(f"export: simplification skipped, the exported graph is kept: {simplify['reason']}")
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
    _say(f"export: student.onnx (opset {opset}{shape}, {EXPORTER_LABELS[info['exporter']]}), max abs diff {check['max_abs_diff']:.2e}, "
         f"agreement {check['agreement']:.4f}")
    for r in info["rejected"]:
        _say(f"export: the {EXPORTER_LABELS[r['exporter']]} was not used: {r['reason']}")
    return run


def _onnx_check(path: Path, ref: np.ndarray, x: np.ndarray, cfg: ExportConfig, transformation: str, tool: str, opset: int, names) -> dict:
    """Run one transformation's graph in ONNX Runtime against the PyTorch logits; a miss is a CompressError naming it."""
    import onnx

    from .export import onnx_io
    from .export.op_support import explain_ort_failure

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


# ---------------------------------------------------------------------------------------------
@_locked
def quantize(run_dir: str | Path, config: QuantizeConfig | None = None, *, force: bool = False, trust: bool = False) -> Run:
    """INT8 (and, where the target takes it, FP16) flavours of the ONNX student. INT8: every candidate recipe of the
    target's is calibrated on the user's rows, judged on a validation split and timed on this CPU; the fastest within
    --int8-tolerance wins. When none is within it, the most sensitive nodes are kept in float until it is, and when even
    that fails, the student is fine-tuned with fake quantization against the teacher (quantization-aware distillation)."""
    from .bench.host import has_vnni
    from .export.onnx_io import make_session, run_session
    from .export.quantize import auto_candidates, get_recipe, preprocess, scratch_dir, to_fp16
    from .export.tolerance import Validation, choose_int8, evaluate

    run, done = _open_stage(run_dir, "quantize", config, force, trust)
    if done:
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
            fp32_eval = evaluate(fp32, val, val.fp32_score())
            chosen = choose_int8(fp32, pre, candidates, calib, val, cfg, Path(tmp), say=_say)
            qat = None
            if chosen["drop_points"] > cfg.int8_tolerance and cfg.qat_steps > 0:
                from .distill.qat import quantization_aware_distill

                qat, qat_trial = quantization_aware_distill(run, chosen, calib, val, cfg, Path(tmp), say=_say)
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
    _say(f"quantize: {chosen['recipe']} -> student.int8.onnx, {val.metric} {chosen['score'] * 100:.2f}% vs FP32 "
         f"{val.fp32_score() * 100:.2f}% on {len(val.x)} validation rows; {chosen['p50_ms_1thread']:.3f} vs "
         f"{fp32_eval['p50_ms_1thread']:.3f} ms FP32 (batch 1, 1 thread)")
    if result["kept_float"]:
        _say("quantize: kept in float to stay within tolerance: " + ", ".join(f"{k['node']} ({k['op']})" for k in result["kept_float"]))
    if not result["within_tolerance"]:
        _say(f"quantize: INT8 still loses {chosen['drop_points']:.2f} points (tolerance {cfg.int8_tolerance:g}): ship FP32"
             + (" or FP16" if fp16 else "") + " for accuracy")
    if chosen["ops_float"]:
        _say(f"quantize: left in float (not quantized by the {chosen['recipe']} recipe): {_op_counts(chosen['ops_float'])}")
    if chosen["fallback"]:
        _say(f"quantize: {chosen['fallback']}")
    if fp16:
        _say(f"quantize: fp16 -> student.fp16.onnx, {val.metric} {fp16['score'] * 100:.2f}%")
    return run


def _op_counts(ops: dict) -> str:
    return ", ".join(f"{op} ×{n}" for op, n in ops.items())


# ---------------------------------------------------------------------------------------------
@_locked
def bench(run_dir: str | Path, config: BenchConfig | None = None, *, force: bool = False, trust: bool = False) -> dict:
    """Measure accuracy, agreement with the teacher, latency, size and parameters of every variant; write report.json."""
    from .bench.report import build_report, load_report
    from .bench.runner_bench import bench_models, preprocessing_time

    run, done = _open_stage(run_dir, "bench", config, force, trust)
    if done:
        return load_report(run.path("report.json"))
    cfg = run.config.bench
    with run.running("bench"):
        models = bench_models(run, cfg)
        rep = build_report(run, models)
        pre = preprocessing_time(run, cfg)
        if pre is not None:
            rep["preprocessing"] = pre
        write_json(run.path("report.json"), rep)
    run.finish("bench", {"report": "report.json"}, {"models": len(models)})
    return rep


@_locked
def report(run_dir: str | Path, merge: str | Path | None = None, *, remote: str | None = None, html: bool | None = None) -> dict:
    """Render report.md from the run's report.json (validated) and return the report; merge folds in a device's report.json
    (remote: the user@host compress bench --remote ran it on, which names the merged rows). html: also write report.html
    (None: only when the run already has one, to keep it in step)."""
    from ._io import write_text
    from .bench.report import load_report, render_markdown

    run = Run.open(run_dir)
    if merge is not None:
        from .bundle import merge_device_report

        merge_device_report(run.dir, merge, remote=remote)
    rep = load_report(run.path("report.json"))
    write_text(run.path("report.md"), render_markdown(rep))
    if html is None:
        html = run.path("report.html").exists()
    if html:
        from .bench.html import render_html

        write_text(run.path("report.html"), render_html(rep))
    run.begin("report")
    run.finish("report", {"markdown": "report.md", **({"html": "report.html"} if html else {})}, {})
    return rep


@_locked
def remote_bench(run_dir: str | Path, host: str, **kw) -> dict:
    """Bench the run's exported models on another machine over SSH (compressor.remote) and merge its rows into the report."""
    from .remote import remote_bench as _remote_bench

    return _remote_bench(run_dir, host, **kw)


@_locked
def bundle(run_dir: str | Path, out: str | Path | None = None, *, force: bool = False) -> dict:
    """Write the Jetson deploy bundle (ONNX files, manifest, build_engine.sh, run_on_device.py, held-out rows) and its .tar.gz."""
    from .bundle import make_bundle

    info = make_bundle(run_dir, out, force=force)
    _say(f"bundle: {info['dir']} and {info['tarball']}")
    return info


def gate(current: str | Path, baseline: str | Path, config=None):
    """Compare a run (or report.json) with a baseline (bundle, run or report.json): the baseline's models are re-timed
    here beside the current ones where both sides have their files (compressor.gate); returns the GateResult."""
    from .config import GateConfig
    from .gate import compare

    return compare(current, baseline, config or GateConfig())


def _report_for(path: str | Path, what: str) -> Path:
    """A report.json, or a run directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise CompressError(f"{what} {p} does not exist" + ("" if p.parent.exists() else " (nor does its folder)"),
                            hint="pass a report.json written by 'compress bench' (or its run directory)")
    return p


# ---------------------------------------------------------------------------------------------
def compress(cfg: CompressConfig, out: str | Path | None = None, *, force: bool = False, resume: bool = False) -> dict:
    """The whole pipeline: distill, export, quantize, bench, report; returns the report."""
    from .ownership import run_lock

    path = claim_out(cfg, out)
    with run_lock(path):  # one lock over every stage: no other process writes between them
        run = distill(cfg, path, force=force, resume=resume)
        # a forced or redone distill makes the later stages stale through their fingerprints
        # trust=True: the code the run names (a student factory, a --teacher-arch) is what this call was given; it runs
        # only where distill could not save a code-free copy (a black-box teacher never runs after distill)
        export(run.dir, force=force, trust=True)
        quantize(run.dir, force=force, trust=True)
        rep = bench(run.dir, force=force, trust=True)
        report(run.dir, html=True)
    return rep
