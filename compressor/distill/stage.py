"""The distill stage: train the student from the teacher (and the labels-only baseline), then save what later stages
need in code-free forms (code_free.py).

One flow with the teacher's kind as its parameter: a white-box teacher's outputs for the whole pool are computed once
(teacher_pass.py) or the teacher runs online on every batch; a black box (a query budget, answers that are not
logits, a callable or a command) is asked in rounds (blackbox.py). Both flows share the
validation split carved from the labeled training rows, the student factory, the preflight, the training of each
job and its result record (jobs.py)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CompressError


# --- the stage --------------------------------------------------------------------------------------------------------
def claim_out(cfg, out) -> Path:
    """--out (or a new runs/<timestamp>) as this run's folder: new, empty, or a run folder already; never the data's."""
    from ..models.query_teacher import is_query_spec
    from ..ownership import claim_run_dir
    from ..run import default_run_dir

    # a missing teacher or data file is refused before --out is made: a typo leaves no folder behind
    t = cfg.teacher
    if t is not None and not is_query_spec(t) and not Path(t).is_file():
        raise CompressError(f"teacher {t} does not exist" if not Path(t).exists() else f"teacher {t} is not a file")
    from ..data.shards import expand, is_shard_spec

    if is_shard_spec(cfg.data.source):
        expand(cfg.data.source)  # every shard there, before --out is made
    elif cfg.data.source != "mnist1d" and not Path(cfg.data.source).exists():
        raise CompressError(f"data {cfg.data.source} does not exist", hint="pass an .npz file, an image folder, or 'mnist1d'")
    return claim_run_dir(Path(out) if out else default_run_dir(), (cfg.data.source, cfg.data.eval_source, *(cfg.data.unlabeled or [])))


def distill_stage(cfg, path: Path, force: bool, resume: bool):
    """Create (or reopen) the run at path, a folder claim_out gave and whose lock the caller holds, and run the
    stage; returns the open Run (its teacher and data loaded, for the stages after it in the same process)."""
    from ..run import Run, skip_done

    run = Run.create(path, cfg)
    run.live = True  # the teacher and the student come from this command line: their code may run (see Run.teacher)
    if skip_done(run, "distill", force):
        return run
    prev = run.manifest["stages"].get("distill", {})
    if resume and prev.get("fingerprint") not in (None, run.fingerprint("distill")):
        raise CompressError("--resume: the inputs or settings differ from the interrupted run", hint="rerun with the original command, or --force to start over")
    from .ddp import in_torchrun

    if run.config.distill.nproc_per_node > 1 and not in_torchrun():
        from .ddp import launch

        run.remove_stale_temporaries()  # here, once: the workers never sweep (each would delete the others' temporaries)
        launch(run.dir, run.config.distill.nproc_per_node, resume)
        return Run.open(run.dir)
    with run.running("distill"):
        check_teacher_student(run)
        outputs, results = run_distill(run, resume)
    run.finish("distill", outputs, results)
    return run


def run_distill(run, resume: bool) -> tuple[dict, dict]:
    """Train by the flow the teacher's kind asks for; then save the code-free copies. Returns (outputs, results)."""
    from . import blackbox
    from .code_free import save_code_free

    if blackbox.wanted(run.config.distill, run.config.teacher):  # a budget, non-logits answers, or a callable/command teacher
        outputs, results = blackbox.distill_blackbox(run, resume)
    else:
        outputs, results = distill_whitebox(run, resume)
    return save_code_free(run, outputs, results)




# --- the white-box flow ----------------------------------------------------------------------------------------------------
def distill_whitebox(run, resume: bool) -> tuple[dict, dict]:
    import torch

    from ..models.outputs import output_note, resolve_teacher_output
    from . import auto_student
    from .jobs import check_student_output, preflight, save_trained, student_context, student_factory, summary, validation_split
    from .._io import is_writer
    from ..data.streaming import is_lazy, take
    from .teacher_pass import heldout_classes, teacher_online, teacher_pool_logits
    from .trainer import budget_steps

    dcfg = run.config.distill
    teacher, ds = run.teacher, run.data
    probe = teacher.logits(ds.x[:2])
    run.check_data_fits_teacher(probe)
    num_classes = probe.shape[1]
    auto = auto_student.wanted(dcfg)  # the student is chosen below, once the teacher's outputs are there to score candidates
    if not auto:
        make = student_factory(dcfg, ds, teacher)
        torch.manual_seed(dcfg.seed)
        student, record = make(num_classes)
        check_student_output(student, ds.x[:2], num_classes, dcfg.student)
        preflight_info = preflight(run, student, ds)
    # logits or probabilities (--teacher-output, else detected on a sample): probabilities are read as their log from here on
    teacher_output = resolve_teacher_output(teacher, ds.x, dcfg.teacher_output)
    online = teacher_online(dcfg)
    pool_logits, teacher_seconds = (None, 0.0) if online and not auto else teacher_pool_logits(run, teacher, ds, dcfg)
    split = validation_split(ds, dcfg)
    steps = budget_steps(dcfg, len(split.train_rows))
    results, outputs = {}, {}
    if auto:
        make, results["auto"] = auto_student.choose(run, dcfg, teacher, ds, num_classes, split, pool_logits, steps,
                                                    student_context(dcfg, ds, teacher), resume=resume)
        torch.manual_seed(dcfg.seed)
        student, record = make(num_classes)
        check_student_output(student, ds.x[:2], num_classes, dcfg.student)
        preflight_info = preflight(run, student, ds)
    if is_lazy(ds.x_test) and is_writer():  # held-out images on disk: decoded (the teacher's answers kept for code_free.py) before any step, so a bad file fails now
        heldout_classes(run, teacher, ds)

    scfg = dcfg  # the student's settings; with --search, the best trial's (the baseline keeps dcfg's)
    if dcfg.search > 0:
        from .search import search_for_distill

        best, results["search"] = search_for_distill(run, dcfg, teacher, ds, split.train_rows, split.x_val, split.y_val, pool_logits,
                                                     lambda: make(num_classes)[0], full_steps=steps, resume=resume)
        scfg = dcfg.replace(**best)
        online = teacher_online(scfg)
        if not online and pool_logits is None:
            pool_logits, teacher_seconds = teacher_pool_logits(run, teacher, ds, dcfg)
    jobs = [("student", scfg.loss, split.train_rows, None if online else take(pool_logits, split.train_rows))]
    if dcfg.baseline:
        jobs.append(("baseline", "labels", split.labeled_train, None))
    for name, loss, rows, tlogits in jobs:
        jcfg = scfg if name == "student" else dcfg.replace(augment="none", mixup=0.0, cutmix=0.0, hint=None)
        torch.manual_seed(dcfg.seed)  # every job starts from the same initial weights
        module, res = _train_whitebox_job(run, name, make(num_classes, fresh=name == "baseline")[0], loss, rows, tlogits, split, jcfg,
                                          online=online and name == "student", steps=steps, resume=resume)
        save_trained(run, name, module, loss, res, rows, outputs, results)
    results["teacher_pass_seconds"] = round(teacher_seconds or 0.0, 3)
    results["teacher_pass"] = "online" if online else "cached" if teacher_seconds is None else "computed"
    results["teacher_online"] = online
    results["teacher_output"] = teacher_output
    results["notes"] = [n for n in [output_note(teacher_output)] if n]  # bench/report.py adds them to the report's notes
    results.update(summary(student, record, num_classes, split, preflight_info, teacher, ds))
    return outputs, results


def _train_whitebox_job(run, name: str, module, loss: str, rows, tlogits, split, jcfg, *, online: bool, steps: int, resume: bool):
    """One white-box job: with the teacher online on every batch (and its hint) when asked, else from its cached outputs."""
    from .jobs import train_job
    from .teacher_pass import online_teacher

    teacher = run.teacher
    kw = online_teacher(teacher, module, run.data.x[:2], jcfg) if online else {}
    module, res = train_job(run, name, module, rows, tlogits, split, jcfg, steps=steps, loss=loss, resume=resume, **kw)
    if kw.get("hint") is not None:
        kw["hint"].remove()
    teacher.to("cpu")
    return module, res


# --- checks --------------------------------------------------------------------------------------------------------------
def check_teacher_student(run) -> None:
    """A student cut from the teacher ('teacher:every-other') fails here, before the teacher's pass over the pool; so
    does a --budget without a student it sizes."""
    from .auto_student import AUTO_SPECS

    spec = run.config.distill.student
    if run.config.distill.budget and spec not in AUTO_SPECS:
        raise CompressError(f"--budget sizes --student auto or teacher:pruned, but the student is {spec or 'the default'}",
                            hint="add --student auto, or drop --budget")
    if spec in AUTO_SPECS:
        from .auto_student import check_auto

        check_auto(run)
        return
    if spec and spec.startswith("teacher:"):
        from ..models.student import from_teacher

        from_teacher(spec, run.teacher)


