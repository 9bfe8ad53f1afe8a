"""Student families for `--student auto`, each sized to a budget by one knob.

The image family is the project's own MobileNet-style network (`builtin:mobilenet`): a stride-2 stem, inverted
residual blocks of depthwise-separable convolutions with squeeze-and-excitation, laid out like MobileNetV3-small
(Howard et al., 2019) with ReLU activations (they quantize to INT8 without a look-up table), channel counts rounded to
multiples of 8 (INT8 kernels and tensor cores want them), and a width and a depth multiplier. On small images the first
strides are dropped so that the last feature map keeps at least 4×4 cells (what the CIFAR versions of these nets do).
timm's edge models (`timm:NAME`) join the image candidates when timm is installed; token ids get the built-in
transformer, signals the 1-D conv net and flat rows the MLP, each widened to the budget.
"""
from __future__ import annotations

import math

from ..errors import CompressError
from .registry import register_student

# (kernel, expansion channels, output channels, squeeze-excite, stride) per block: MobileNetV3-small's layout
_LAYOUT = [
    (3, 16, 16, True, 2),
    (3, 72, 24, False, 2), (3, 88, 24, False, 1),
    (5, 96, 40, True, 2), (5, 240, 40, True, 1), (5, 240, 40, True, 1), (5, 120, 48, True, 1), (5, 144, 48, True, 1),
    (5, 288, 96, True, 2), (5, 576, 96, True, 1), (5, 576, 96, True, 1),
]
# the stages (runs of blocks between strides) whose length the depth multiplier scales: block indices into _LAYOUT
_STAGES = [[0], [1, 2], [3, 4, 5, 6, 7], [8, 9, 10]]
TIMM_IMAGE_MODELS = ("mobilenetv3_small_050", "mobilenetv3_small_075", "mobilenetv3_small_100", "lcnet_100",
                     "mobilenetv3_large_075", "efficientnet_lite0", "regnetx_004", "resnet18")


def divisible(v: float, by: int = 8) -> int:
    """v rounded to a multiple of `by`, never below `by` nor more than 10% below v (MobileNet's rule)."""
    out = max(by, int(v + by / 2) // by * by)
    return out + by if out < 0.9 * v else out


def _strides(side: int) -> int:
    """How many of the network's five stride-2 steps an image of this side keeps (last map at least 4×4)."""
    return max(0, min(5, int(math.floor(math.log2(max(side, 1) / 4)))))


@register_student("mobilenet")
def mobilenet(input_shape: tuple, num_classes: int, width: float = 1.0, depth: float = 1.0):
    """The project's MobileNet-style image student for (C, H, W) rows: width and depth multipliers scale it."""
    import torch.nn as nn

    if len(input_shape) != 3:
        raise CompressError(f"builtin:mobilenet takes images shaped (C, H, W), but the data's rows are {tuple(input_shape)}")
    in_ch, side = int(input_shape[0]), int(min(input_shape[1:]))
    keep = _strides(side)  # the first (5 - keep) strides become 1
    drop = 5 - keep

    class SqueezeExcite(nn.Module):
        def __init__(self, ch):
            super().__init__()
            mid = divisible(ch / 4)
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, mid, 1), nn.ReLU(inplace=True),
                                      nn.Conv2d(mid, ch, 1), nn.Hardsigmoid())

        def forward(self, x):
            return x * self.gate(x)

    class InvertedResidual(nn.Module):
        def __init__(self, cin, k, exp, cout, se, stride):
            super().__init__()
            layers = []
            if exp != cin:
                layers += [nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp, bias=False), nn.BatchNorm2d(exp), nn.ReLU(inplace=True)]
            if se:
                layers.append(SqueezeExcite(exp))
            layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.block(x)
            return x + y if self.residual else y

    stem = divisible(16 * width)
    strides_seen = 1  # the stem is the first stride-2 step (stride 1 when drop > 0)
    blocks, cin = [], stem
    for stage in _STAGES:
        n = max(1, math.ceil(len(stage) * depth))
        for j, i in enumerate(stage[:n]):
            k, exp, cout, se, stride = _LAYOUT[i]
            if stride == 2 and j == 0:
                strides_seen += 1
                stride = 2 if strides_seen > drop else 1
            blocks.append(InvertedResidual(cin, k, divisible(exp * width), divisible(cout * width), se, stride))
            cin = divisible(cout * width)
    last, hidden = divisible(576 * width), divisible(1024 * width)

    class MobileNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_ch, stem, 3, 2 if drop == 0 else 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
            self.blocks = nn.Sequential(*blocks)
            self.last = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(last, hidden), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(hidden, num_classes))

        def forward(self, x):
            return self.head(self.pool(self.last(self.blocks(self.stem(x)))))

    return MobileNet()


def mobilenet_depth(width: float) -> float:
    """The depth multiplier that goes with a width (one knob): full depth from width 0.5 up, shallower below."""
    return round(min(1.0, max(0.34, 2 * width)), 3)


# --- one knob per family ------------------------------------------------------------------------------------------------
# Each family maps a knob to the kwargs of its builtin factory; the knob's range is searched for the largest member
# within the limits (bigger knob, more parameters and MACs).
def family_for(input_shape: tuple, token_ids: bool) -> str:
    if token_ids:
        return "transformer"
    return {1: "cnn1d", 2: "cnn1d", 3: "mobilenet"}.get(len(input_shape), "mlp")


def family_kwargs(family: str, knob: float, ctx: dict) -> dict:
    """The factory kwargs for `family` at `knob` (a width multiplier for mobilenet, a channel width otherwise)."""
    if family == "mobilenet":
        w = round(float(knob), 3)
        return {"width": w, "depth": mobilenet_depth(w)}
    width = divisible(knob, 8 if knob >= 16 else 4)
    if family == "transformer":
        return {"width": width, "layers": 2 if width < 128 else 4, "vocab_size": int(ctx["vocab_size"])}
    return {"width": width}


KNOB_RANGE = {"mobilenet": (0.05, 4.0), "transformer": (4, 768), "cnn1d": (4, 1024), "mlp": (4, 8192)}


def largest_within(build, fits, lo: float, hi: float, iters: int = 14):
    """The largest knob in [lo, hi] whose member fits (bisection on a log scale; members grow with the knob).
    build(knob) -> module; fits(module) -> bool. None when even `lo` does not fit."""
    if not fits(build(lo)):
        return None
    if fits(build(hi)):
        return hi
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = (a + b) / 2
        if fits(build(math.exp(mid))):
            a = mid
        else:
            b = mid
    return math.exp(a)
