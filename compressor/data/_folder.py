"""Image folders in the torchvision ImageFolder layout: root/<class>/<image>."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import CompressError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _scan(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise CompressError(f"image folder {root} has no class sub-folders", hint="lay it out as root/<class>/<image>.png")
    items = []
    for i, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((f, i))
    if not items:
        raise CompressError(f"image folder {root} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return classes, items


def _read(items, size: tuple[int, int], channels: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    x = np.empty((len(items), channels, size[0], size[1]), np.float32)
    for n, (f, _) in enumerate(items):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise CompressError(f"cannot read image {f}: {exc}", hint="remove or replace the file") from None
        x[n] = a[None] if channels == 1 else a.transpose(2, 0, 1)
    if cfg.mean is not None or cfg.std is not None:
        mean = np.asarray(cfg.mean if cfg.mean is not None else [0.0] * channels, np.float32).reshape(-1, 1, 1)
        std = np.asarray(cfg.std if cfg.std is not None else [1.0] * channels, np.float32).reshape(-1, 1, 1)
        if mean.shape[0] not in (1, channels) or std.shape[0] not in (1, channels) or (std <= 0).any():
            raise CompressError(f"--mean/--std need 1 or {channels} values, std > 0")
        x = (x - mean) / std
    return x, np.asarray([c for _, c in items], np.int64)


def _heldout_root(root: Path, cfg: DataConfig) -> Path | None:
    if cfg.eval_source:
        p = Path(cfg.eval_source)
        if not p.is_dir():
            raise CompressError(f"--eval-data {p} is not a folder")
        return p
    if root.name.lower() == "train":
        for name in ("test", "val", "valid", "validation"):
            if (root.parent / name).is_dir():
                return root.parent / name
    return None


def load_image_folder(cfg: DataConfig, teacher_input_shape: tuple | None):
    """Images scaled to [0,1] (then --mean/--std), sized and coloured as the teacher expects."""
    from PIL import Image

    from . import Dataset, stratified_split

    root = Path(cfg.source)
    classes, items = _scan(root)
    # Size and channels: flags first, then the teacher's declared input (N, C, H, W), then the first image.
    channels, size = cfg.channels, tuple(cfg.image_size) if cfg.image_size else None
    if teacher_input_shape is not None and len(teacher_input_shape) == 4:
        c, h, w = teacher_input_shape[1:]
        channels = channels or (c if isinstance(c, int) else None)
        if size is None and isinstance(h, int) and isinstance(w, int):
            size = (h, w)
    if channels is None or size is None:
        try:
            with Image.open(items[0][0]) as im:
                channels = channels or (1 if im.mode in ("L", "1", "I;16", "I", "F") else 3)
                size = size or (im.size[1], im.size[0])
        except OSError as exc:
            raise CompressError(f"cannot read image {items[0][0]}: {exc}") from None
    if channels not in (1, 3):
        raise CompressError(f"--channels must be 1 or 3, got {channels}")
    x, y = _read(items, size, channels, cfg)
    held_root = _heldout_root(root, cfg)
    if held_root is not None:
        held_classes, held_items = _scan(held_root)
        unknown = set(held_classes) - set(classes)
        if unknown:
            raise CompressError(f"held-out folder {held_root} has classes not in {root}: {sorted(unknown)}")
        remap = {i: classes.index(c) for i, c in enumerate(held_classes)}
        xt, yt = _read(held_items, size, channels, cfg)
        yt = np.asarray([remap[int(v)] for v in yt], np.int64)
        return Dataset(x, y, xt, yt, "folder", str(root), class_names=classes)
    keep, held = stratified_split(y, cfg.heldout_fraction, cfg.seed)
    if len(held) == 0:
        raise CompressError(f"image folder {root}: too few images to hold any out", hint="add a sibling test/ folder or --eval-data")
    return Dataset(x[keep], y[keep], x[held], y[held], "split", str(root), class_names=classes)
