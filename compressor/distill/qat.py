"""Quantization-aware distillation: the last resort when INT8 misses its tolerance even with sensitive nodes in float.

The trained student's Conv/Linear layers are wrapped with fake quantization (per-channel symmetric int8 weights, and a
per-tensor int8 range on each layer's input whose bounds are learned, LSQ-style, through a straight-through rounding),
and the student is fine-tuned against the teacher's soft targets. The learned input ranges are then written into the
graph as Clip nodes before each layer, so the exported FP32 model carries them and ONNX Runtime's calibration, which
reads the ranges from the data, lands on the same ones; the Q/DQ model is then built with the same recipe as before.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import CompressError


def _fake_quant(x, lo, hi, signed: bool):
    """Quantize-dequantize x to 8 bits over [lo, hi]; rounding passes the gradient straight through, the bounds learn."""
    import torch

    if signed:  # symmetric, zero point 0
        scale = torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-8) / 127.0
        zp, qmin, qmax = 0.0, -128.0, 127.0
    else:
        scale = (hi - lo).clamp_min(1e-8) / 255.0
        zp, qmin, qmax = (-lo / scale).detach().round(), 0.0, 255.0
    v = x / scale + zp
    v = v + (v.round() - v).detach()
    return (torch.clamp(v, qmin, qmax) - zp) * scale


def _wrap(module, signed: bool, weight_bits: int = 8):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class FakeQuant(nn.Module):
        """A Conv/Linear whose input and weight pass through 8-bit fake quantization."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            # the bounds are learned relative to the range the calibration rows show (lo0 * a, hi0 * b, a = b = 1 at
            # first), so one learning rate fits activations of any scale
            self.register_buffer("lo0", torch.tensor(0.0))
            self.register_buffer("hi0", torch.tensor(1e-6))
            self.a = nn.Parameter(torch.tensor(1.0))
            self.b = nn.Parameter(torch.tensor(1.0))
            self.observing = True

        @property
        def lo(self):
            return self.lo0 * self.a

        @property
        def hi(self):
            return self.hi0 * self.b

        def forward(self, x):
            if self.observing:  # calibration pass: the range the data shows
                with torch.no_grad():
                    self.lo0.copy_(torch.minimum(self.lo0, x.min()))
                    self.hi0.copy_(torch.maximum(self.hi0, x.max()))
                return self.inner(x)
            x = _fake_quant(x, self.lo, self.hi, signed)
            w = self.inner.weight
            dims = tuple(range(1, w.dim()))
            wmax = 2.0 ** (weight_bits - 1) - 1  # 127, or 63 for the 7-bit weights of a reduced-range recipe
            wscale = w.detach().abs().amax(dim=dims, keepdim=True).clamp_min(1e-8) / wmax
            wq = w + ((w / wscale).round().clamp(-wmax - 1, wmax) * wscale - w).detach()
            if isinstance(self.inner, nn.Linear):
                return F.linear(x, wq, self.inner.bias)
            return self.inner._conv_forward(x, wq, self.inner.bias)

    return FakeQuant(module)


def _fold_bn(model) -> int:
    """Fold every BatchNorm that directly follows a Conv inside an nn.Sequential into that Conv (as ONNX export and
    ONNX Runtime do), so fake quantization sees the weights that will be quantized. Returns how many were folded."""
    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, (nn.Conv1d, nn.Conv2d)) and isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
                seq._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                seq._modules[b] = nn.Identity()
                folded += 1
    return folded


def _replace(model, fn) -> int:
    """Replace every Conv1d/Conv2d/Linear child with fn(child), recursively; returns how many were replaced."""
    import torch.nn as nn

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Conv1d, nn.Conv2d, nn.Linear):
                setattr(parent, name, fn(child))
                n += 1
    return n


def _with_clips(model) -> None:
    """After training: each fake-quantized layer becomes Clip(learned bounds) -> the original layer (fine-tuned)."""
    import torch
    import torch.nn as nn

    class Clipped(nn.Module):
        def __init__(self, inner, lo, hi):
            super().__init__()
            self.inner, self.lo, self.hi = inner, float(lo), float(hi)

        def forward(self, x):
            return self.inner(torch.clamp(x, self.lo, self.hi))

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "FakeQuant":
                setattr(parent, name, Clipped(child.inner, child.lo.detach(), child.hi.detach()))


def quantization_aware_distill(run, chosen: dict, calib: np.ndarray, val, cfg, workdir: Path, say=print) -> tuple[dict, dict | None]:
    """Fine-tune the student with fake quantization against the teacher, export it with its learned ranges as Clip
    nodes, quantize with chosen's recipe (and its float nodes) and evaluate. Returns (what was done, the new trial)."""
    import torch
    import torch.nn.functional as F

    from .teacher_pass import teacher_pool_logits
    from ..export.onnx_io import export_onnx
    from ..export.quantize import get_recipe, preprocess, quantize_with
    from ..export.tolerance import evaluate

    recipe = get_recipe(chosen["recipe"])
    if recipe.kind != "static":
        return {"skipped": f"the {recipe.name} recipe is not calibrated"}, None
    try:
        student = run.load_trained("student", eager=True)  # an nn.Module to modify (user code: only with --trust)
    except CompressError as exc:
        return {"skipped": str(exc)}, None
    dcfg, ds = run.config.distill, run.data
    if ds.token_ids:
        return {"skipped": "token-id students are not fine-tuned with fake quantization"}, None
    say(f"quantize: quantization-aware distillation, {cfg.qat_steps} steps against the teacher")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    student.eval()
    folded = _fold_bn(student)
    signed = recipe.activation == "s8"
    wrapped = _replace(student, lambda m: _wrap(m, signed, 7 if recipe.reduce_range else 8))
    if not wrapped:
        return {"skipped": "the student has no Conv/Linear layer to fine-tune"}, None
    fq = [m for m in student.modules() if type(m).__name__ == "FakeQuant"]
    with torch.no_grad():
        student(torch.from_numpy(np.ascontiguousarray(calib)))
    for m in fq:
        m.observing = False
    try:
        targets, _ = teacher_pool_logits(run, run.teacher, ds, dcfg)
    except CompressError as exc:  # a black box, or a teacher that needs code: not run again in a later stage
        return {"skipped": str(exc)}, None
    targets = torch.from_numpy(np.array(targets, np.float32))
    x_all = ds.x  # indexed per step: an image folder's rows are decoded only when a batch asks for them
    temp = float(dcfg.temperature)
    bounds = [p for m in fq for p in (m.a, m.b)]
    weights = [p for n, p in student.named_parameters() if not n.endswith((".a", ".b"))]
    opt = torch.optim.Adam([{"params": weights, "lr": dcfg.lr * 0.05}, {"params": bounds, "lr": 1e-2}])
    g = torch.Generator().manual_seed(cfg.seed)
    student.train()
    for m in student.modules():  # BatchNorm left unfolded keeps its running statistics
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.eval()
    for _ in range(cfg.qat_steps):
        idx = torch.randint(0, len(x_all), (min(dcfg.batch_size, len(x_all)),), generator=g)
        out = student(torch.from_numpy(np.ascontiguousarray(x_all[idx.numpy()])))
        loss = F.kl_div(F.log_softmax(out / temp, 1), F.softmax(targets[idx] / temp, 1), reduction="batchmean") * temp * temp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.eval()
    _with_clips(student)
    qat_fp32 = workdir / "student.qat.onnx"
    export_onnx(student, ds.x[:2], qat_fp32, run.stage("export")["result"]["check"]["opset"])
    qat_pre = workdir / "qat.pre.onnx"
    preprocess(qat_fp32, qat_pre)
    path = workdir / "qat-int8.onnx"
    exclude = [n for n in chosen.get("kept_float") or []]
    try:
        info = quantize_with(recipe, qat_fp32, qat_pre, path, calib, cfg.calibrate_method, cfg.per_channel, exclude=exclude or None)
    except CompressError:  # node names differ after the rewrite: quantize every node
        exclude = []
        info = quantize_with(recipe, qat_fp32, qat_pre, path, calib, cfg.calibrate_method, cfg.per_channel)
    trial = {"recipe": recipe.name, **evaluate(path, val, val.fp32_score(), recipe.name), "fallback": info["fallback"], "path": path,
             "kept_float": exclude, "qat": True}
    done = {"steps": cfg.qat_steps, "layers": wrapped, "batchnorm_folded": folded, "seconds": round(time.perf_counter() - t0, 2),
            "drop_points": trial["drop_points"], "used": trial["drop_points"] < chosen["drop_points"]}
    say(f"quantize: after quantization-aware distillation INT8 {val.metric} drop {trial['drop_points']:.2f} points "
        f"(was {chosen['drop_points']:.2f})")
    return done, trial
