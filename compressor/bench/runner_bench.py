"""Bench every model variant of a run through the runners: held-out accuracy, agreement with the
teacher, batch latency, file size and parameter count."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import BenchConfig
from ..runtime import Runner, infer_batched
from ..runtime.registry import get_runner
from .latency import measure


def _params_onnx(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT))


def _latency(runner: Runner, run, cfg: BenchConfig) -> dict:
    x1 = np.ascontiguousarray(run.data.x_test[: cfg.batch_size])
    return measure(lambda: runner.infer(x1), warmup_ms=cfg.warmup_ms, warmup_runs=cfg.warmup_runs,
                   min_runs=cfg.min_runs, min_duration_s=cfg.min_duration_s)


def _one(name: str, role: str, precision: str, runner: Runner, path: Path, params: int, run, cfg: BenchConfig, teacher_pred,
         accuracy_runner: Runner | None = None, known_pred: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """One row; accuracy_runner, when given, computes the outputs (a TensorRT Q/DQ graph with its arithmetic emulated)
    while `runner` is timed; known_pred, when given, is the model's class for each held-out row computed already
    (the teacher's, by the distill stage), so only the timing runs it."""
    ds = run.data
    pred = known_pred
    if accuracy_runner is not None and pred is None:
        with accuracy_runner:
            pred = infer_batched(accuracy_runner, ds.x_test, cfg.eval_batch_size).argmax(1)
    with runner:
        if pred is None:
            pred = infer_batched(runner, ds.x_test, cfg.eval_batch_size).argmax(1)
        lat = _latency(runner, run, cfg)
    desc = runner.describe()
    return {
        "name": name, "role": role, "format": desc["format"], "precision": precision, "runtime": desc["runtime"],
        "device": (f"host gpu ({desc['provider']})" if desc.get("provider", "CPUExecutionProvider") != "CPUExecutionProvider"
                   else f"host cpu ({desc['threads']} threads)"),
        "path": os.path.relpath(path, run.dir), "size_bytes": int(path.stat().st_size) if path.is_file() else 0, "params": int(params),
        "accuracy": float(np.mean(pred == ds.y_test)),
        "agreement": float(np.mean(pred == teacher_pred)) if teacher_pred is not None else 1.0,
        "latency_ms": lat, "batch_size": cfg.batch_size, "threads": desc["threads"],
    }, pred


def teacher_row(run, teacher, cfg: BenchConfig, num_classes: int | None) -> tuple[dict, np.ndarray, Runner, BenchConfig]:
    """The teacher's row, its class for each held-out row, its runner and the settings it was timed with."""
    t_runner = get_runner("teacher")(teacher, cfg.threads, num_classes=num_classes)
    # a black box (callable or command) may be slow or paid per call: a short latency measurement is enough
    t_cfg = replace(cfg, warmup_ms=0.0, warmup_runs=1, min_runs=min(cfg.min_runs, 10), min_duration_s=0.0) if hasattr(teacher, "answers") else cfg
    # the teacher's held-out classes, where the distill stage recorded them, are not computed again
    row, pred = _one("teacher", "teacher", "fp32", t_runner, teacher.path, teacher.num_params() or 0, run, t_cfg, None,
                     known_pred=run.teacher_heldout_pred())
    return row, pred, t_runner, t_cfg


def bench_models(run, cfg: BenchConfig) -> list[dict]:
    """Bench the teacher, the student (PyTorch, ONNX FP32, ONNX INT8) and the baseline when trained."""
    threads = cfg.threads
    distill = run.stage("distill")
    student_params = distill["result"]["params"]
    recorded = run.blackbox_teacher_row()
    if recorded is not None:  # a black box is never queried after distill: the row that stage measured (api._save_code_free)
        t_row, teacher_pred, runners = recorded, run.teacher_heldout_pred(), []
    else:
        t_row, teacher_pred, t_runner, t_cfg = teacher_row(run, run.teacher, cfg, distill["result"].get("num_classes"))
        runners = [(t_row, t_runner, t_cfg)]
    rows = [t_row]

    def add(*args):
        rows.append(_one(*args, run, cfg, teacher_pred)[0])
        runners.append((rows[-1], args[3], cfg))

    torch_runner, ort_runner = get_runner("torch"), get_runner("onnxruntime")
    student = run.load_trained("student")
    add("student", "student", "fp32", torch_runner(student, threads), run.path("student.pt"), student_params)
    _save_timing_copies(run, cfg, student, rows[-1])
    if "baseline" in distill["outputs"]:
        add("baseline (labels only)", "baseline", "fp32", torch_runner(run.load_trained("baseline"), threads),
            run.path("baseline.pt"), student_params)
    from ..runtime import pick_providers

    providers = pick_providers(cfg.providers)
    fp32 = run.path(run.stage("export")["outputs"]["onnx_fp32"])
    add("student onnx fp32", "student", "fp32", ort_runner(fp32, threads, providers), fp32, student_params)
    outputs = run.stage("quantize")["outputs"]
    if "onnx_fp16" in outputs:  # the FP16 flavour, where the target takes it (on a CPU it shows accuracy, not speed)
        fp16 = run.path(outputs["onnx_fp16"])
        add("student onnx fp16", "student", "fp16", ort_runner(fp16, threads, providers), fp16, student_params)
    int8 = run.path(outputs["onnx_int8"])
    # a TensorRT graph's accuracy is the device's: Q/DQ emulated, not this CPU's integer kernels (which saturate on x86
    # without VNNI); its latency here is ONNX Runtime's, as for every host row
    emulated = ort_runner(int8, threads, providers, emulate_qdq=True) if run.stage("quantize")["result"].get("recipe") == "tensorrt" else None
    rows.append(_one("student onnx int8", "student", "int8", ort_runner(int8, threads, providers), int8, student_params, run, cfg,
                     teacher_pred, accuracy_runner=emulated)[0])
    if emulated is not None:
        rows[-1]["accuracy_note"] = "Q/DQ arithmetic emulated as TensorRT computes it"
    runners.append((rows[-1], ort_runner(int8, threads, providers), cfg))
    if cfg.repeat > 1:
        _rounds(runners, run, cfg)
    if cfg.batch_sweep:
        batch_sweep(runners, run, cfg)
    res = distill["result"]
    for row in rows:  # multiply-accumulates per row, counted by the distill stage (torch.utils.flop_counter)
        macs = res.get("teacher_macs") if row["role"] == "teacher" else res.get("macs")
        if isinstance(macs, int):
            row["macs"] = macs
    return rows


def _save_timing_copies(run, cfg: BenchConfig, student, row: dict) -> None:
    """What compress gate needs to re-time this run beside a baseline without running the student's code: the batch
    the latencies are measured on (latency_sample.npy) and a TorchScript trace of the PyTorch student
    (student.torchscript.pt, named by the row's timing_file). A student that does not trace keeps no copy: the gate
    then says why it cannot re-time that row."""
    import torch

    from .._io import atomic_path
    from .retime import SAMPLE

    x1 = np.ascontiguousarray(run.data.x_test[: cfg.batch_size])
    with atomic_path(run.path(SAMPLE)) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, x1, allow_pickle=False)
    try:
        with torch.inference_mode(False), torch.no_grad():
            traced = student if isinstance(student, torch.jit.ScriptModule) else \
                torch.jit.trace(student.eval(), torch.from_numpy(x1), check_trace=False, strict=False)  # the run's copy is one already
        torch_runner = get_runner("torch")
        with torch_runner(traced, cfg.threads) as r:  # the copy must run and give the student's logits, or it is not kept
            y = r.infer(x1)
        with torch_runner(student, cfg.threads) as r:
            ref = r.infer(x1)
        if not (isinstance(y, np.ndarray) and y.shape == ref.shape and np.allclose(y, ref, rtol=1e-3, atol=1e-4)):
            raise ValueError("the traced copy does not reproduce the student's outputs")
        with atomic_path(run.path("student.torchscript.pt")) as tmp:
            torch.jit.save(traced, str(tmp))
        row["timing_file"] = "student.torchscript.pt"
    except Exception as exc:  # tracing is best effort: data-dependent control flow, exotic outputs
        import logging

        run.path("student.torchscript.pt").unlink(missing_ok=True)
        logging.getLogger("compressor").debug(f"bench: no TorchScript copy of the student for compress gate ({type(exc).__name__}: {exc})")


def _rounds(runners: list, run, cfg: BenchConfig) -> None:
    """--repeat N: N - 1 more latency rounds, every model once per round in turn, so a burst of other work on the
    machine hits every model alike. Each row keeps its rounds' p50s ("samples_p50", what compress gate tests) and
    reports their median as p50. A black-box teacher is not asked again (its calls may cost money)."""
    samples = [[row["latency_ms"]["p50"]] for row, _, _ in runners]
    for _ in range(cfg.repeat - 1):
        for (row, runner, rcfg), acc in zip(runners, samples):
            if rcfg is not cfg:
                continue
            with runner:
                acc.append(_latency(runner, run, cfg)["p50"])
    from .latency import NOISY_ROUNDS

    for (row, _, rcfg), acc in zip(runners, samples):
        if len(acc) > 1:
            spread = max(acc) / min(acc) - 1.0 if min(acc) > 0 else 0.0
            row["latency_ms"].update(samples_p50=[float(v) for v in acc], p50=float(np.median(acc)), rounds=len(acc),
                                     rounds_spread=float(spread), noisy=bool(row["latency_ms"].get("noisy")) or spread > NOISY_ROUNDS)


def batch_sweep(runners: list, run, cfg: BenchConfig) -> None:
    """--batch-sweep: each ONNX model timed at every batch size (rows of the held-out set, repeated if fewer);
    throughput = batch / p50. Shorter measurements than the batch-1 latency: a third of min_duration each."""
    for row, runner, _ in runners:
        if row["format"] != "onnx":
            continue
        points = []
        with runner:
            for b in cfg.batch_sweep:
                xt = run.data.x_test
                x = np.ascontiguousarray(xt[np.arange(b) % len(xt)])
                lat = measure(lambda: runner.infer(x), warmup_ms=cfg.warmup_ms / 2, warmup_runs=3, min_runs=max(10, cfg.min_runs // 10),
                              min_duration_s=cfg.min_duration_s / 3)
                points.append({"batch": int(b), "p50_ms": lat["p50"], "items_per_s": 1e3 * b / lat["p50"] if lat["p50"] > 0 else 0.0})
        row["throughput"] = points


def preprocessing_time(run, cfg: BenchConfig) -> dict | None:
    """For image-folder data: the time to turn one image file into the model's input the way the tool does (PIL decode,
    convert, resize, scale, normalise), batch 1, one thread, same methodology as the models; shown next to them,
    since the application pays it on every frame. None for array data (.npz, mnist1d), which arrives preprocessed."""
    from pathlib import Path as _Path

    from ..data.image_folder import read_images, scan_image_folder

    from ..data.shards import first_sample_decoder, is_shard_spec

    src, shape = run.config.data.source, run.data.input_shape
    if len(shape) != 3:
        return None
    if is_shard_spec(src):  # one sample of the first shard: read at its offset, then decoded as a file would be
        dec, name = first_sample_decoder(src, (shape[1], shape[2]), shape[0], run.config.data)
        what, fn = "read one sample's image from its shard, decode, convert, resize, scale and normalise it (PIL)", lambda: dec(0)
    else:
        root = _Path(src)
        if not root.is_dir() or (root / "x.npy").is_file():
            return None
        items = scan_image_folder(root)[1][:1]
        if not items:
            return None
        name, what = str(items[0][0]), "decode, convert, resize, scale and normalise one image file (PIL), as the tool reads its data"

        def fn():
            return read_images(items, (shape[1], shape[2]), shape[0], run.config.data)
    lat = measure(fn, warmup_ms=cfg.warmup_ms / 2, warmup_runs=cfg.warmup_runs, min_runs=cfg.min_runs, min_duration_s=cfg.min_duration_s)
    return {"what": what, "image": name, "latency_ms": lat}
