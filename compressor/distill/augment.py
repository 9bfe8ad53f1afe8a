"""Augmentation for function matching (Beyer et al., 2022): teacher and student see the very same augmented
view, so the student learns the teacher's function around the data, not just at it.

Presets by data kind, each applied to a whole batch on its device with a seeded generator (a resumed run
draws the same views):
- signal (1-D, shaped (L,) or (C, L)): a random shift of up to 10% of the length (zero-filled), an amplitude
  scale in [0.8, 1.2] and Gaussian noise at 5% of the batch's standard deviation;
- image ((C, H, W)): a random crop after padding by 1/8 of the side (reflect) and a horizontal flip.
  Switch flips off (augment="image-noflip") where mirroring changes the meaning (digits, text).
- none: the rows as they are. Integer token ids are never augmented.
mixup / cutmix blend pairs of rows; with them the teacher's outputs on the blend are the only target.
"""
from __future__ import annotations

from ..errors import CompressError, did_you_mean

PRESETS = ("none", "auto", "signal", "image", "image-noflip")


def resolve(name: str, input_shape: tuple, integer_input: bool = False) -> str:
    """The preset a name means for data of this shape ('auto' picks by the number of dimensions)."""
    if name not in PRESETS:
        raise CompressError(f"unknown augmentation '{name}'.{did_you_mean(name, PRESETS)}", hint=f"choose one of {', '.join(PRESETS)}")
    if integer_input:
        if name not in ("none", "auto"):
            raise CompressError(f"augmentation '{name}' does not apply to integer token ids", hint="use --augment none")
        return "none"
    if name == "auto":
        return "signal" if len(input_shape) in (1, 2) else "image" if len(input_shape) == 3 else "none"
    want = {"signal": (1, 2), "image": (3,), "image-noflip": (3,)}.get(name)
    if want and len(input_shape) not in want:
        raise CompressError(f"augmentation '{name}' expects rows shaped {'(L,) or (C, L)' if name == 'signal' else '(C, H, W)'}, "
                            f"but the data's rows are {tuple(input_shape)}", hint="use --augment auto or none")
    return name


def augment(x, preset: str, gen):
    """A new batch: the preset applied to x (N, ...) with randomness drawn from the CPU torch.Generator gen."""
    if preset == "none":
        return x
    if preset == "signal":
        return _signal(x, gen)
    return _image(x, gen, flip=preset == "image")


class RowViews:
    """Function matching's view of one row, made where the row is decoded (a DataLoader worker) rather than on the
    decoded global batch: seeded by (seed, step, the row's place in the global batch), so any number of ranks and
    workers, and a resumed run, draw the same view of the same row, and each rank decodes only its share. For images the
    view (reflect-pad, crop, flip) only moves pixels, so making it after --mean/--std equals making it on the uint8
    image. (mixup/cutmix blend rows of the whole batch and stay on the batch.)"""

    def __init__(self, preset: str, seed: int):
        self.preset, self.seed = preset, int(seed)

    def __call__(self, row, step: int, pos: int):
        import numpy as np
        import torch

        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, 7, int(step), int(pos)]).integers(2**62)))
        return augment(torch.from_numpy(np.ascontiguousarray(row)[None]), self.preset, gen)[0].numpy()


def _rand(shape, x, gen):
    import torch

    return torch.rand(shape, generator=gen).to(x.device, x.dtype)


def _signal(x, gen):
    import torch

    n, length = x.shape[0], x.shape[-1]
    max_shift = max(1, length // 10)
    shift = (torch.randint(-max_shift, max_shift + 1, (n,), generator=gen)).to(x.device)
    pos = torch.arange(length, device=x.device)[None, :] - shift[:, None]  # source index for each output position
    valid = (pos >= 0) & (pos < length)
    flat = x.reshape(n, -1, length)
    idx = pos.clamp(0, length - 1)[:, None, :].expand_as(flat)
    out = torch.gather(flat, 2, idx) * valid[:, None, :]
    scale = 0.8 + 0.4 * _rand((n, 1, 1), x, gen)
    noise = torch.randn(flat.shape, generator=gen).to(x.device, x.dtype) * (0.05 * x.std())
    return (out * scale + noise).reshape(x.shape)


def _image(x, gen, flip: bool):
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = F.pad(x, (pw, pw, ph, ph), mode="reflect")
    oy = torch.randint(0, 2 * ph + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pw + 1, (n,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None, :])  # (n, h)
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None, :])  # (n, w)
    b = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mirror = _rand((n,), x, gen) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def mix(x, mixup: float, cutmix: float, rng):
    """Blend each row with a random partner (mixup or cutmix, one per batch); rng is a seeded numpy Generator.
    Returns the batch and whether it was mixed."""
    import torch

    use_cutmix = cutmix > 0 and x.dim() >= 3 and (mixup <= 0 or rng.random() < 0.5)
    a = cutmix if use_cutmix else mixup
    if a <= 0:
        return x, False
    lam = float(rng.beta(a, a))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    if not use_cutmix:
        return lam * x + (1 - lam) * x[perm], True
    h, w = x.shape[-2], x.shape[-1]
    ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1, x0, x1 = max(0, cy - ch // 2), min(h, cy + ch // 2), max(0, cx - cw // 2), min(w, cx + cw // 2)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, True
