"""Data sources: an .npz file, a folder of .npy arrays, an image folder, WebDataset tar shards, or the built-in mnist1d;
plus splits and checks."""
from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..errors import CompressError
from .dataset import Dataset, check_classes, check_token_ids, is_token_ids, stratified_split, validate  # noqa: F401  (re-exported)


def load_data(cfg: DataConfig, *, teacher_input_shape: tuple | None = None, cache_dir: Path | None = None) -> Dataset:
    """Load and validate the data named by cfg.source."""
    src = cfg.source
    image_only = [flag for flag, v in (("--image-size", cfg.image_size), ("--channels", cfg.channels), ("--mean", cfg.mean),
                                        ("--std", cfg.std), ("--unlabeled", cfg.unlabeled), ("--resize", cfg.resize),
                                        ("--crop", cfg.crop)) if v is not None]
    from .shards import is_shard_spec, load_shards

    if is_shard_spec(src):  # WebDataset tar shards
        return validate(load_shards(cfg, teacher_input_shape))
    if image_only and not (src != "mnist1d" and Path(src).is_dir()):
        raise CompressError(f"{', '.join(image_only)} apply to image folders only (and shards), but --data {src} is not a folder",
                            hint="arrays from an .npz (or mnist1d) are used as stored: normalise them before saving, or drop those flags")
    if src == "mnist1d":
        from ._mnist1d import load_mnist1d

        ds = load_mnist1d(cfg, cache_dir)
    else:
        path = Path(src)
        if not path.exists():
            raise CompressError(f"data {src} does not exist", hint="pass an .npz file, an image folder, or 'mnist1d'")
        if path.is_dir() and (path / "x.npy").is_file():  # a folder of memory-mapped arrays
            if image_only:
                raise CompressError(f"{', '.join(image_only)} apply to image folders only, but --data {src} is a folder of .npy arrays",
                                    hint="arrays are used as stored: normalise them before saving, or drop those flags")
            from .npy_folder import load_npy_folder

            ds = load_npy_folder(path, cfg)
        elif path.is_dir():
            from .image_folder import load_image_folder

            ds = load_image_folder(cfg, teacher_input_shape)
        elif not path.is_file():  # a FIFO would block the reader forever, /dev/zero would never end
            raise CompressError(f"data {src} is not a regular file (a FIFO, a device or a socket)", hint="pass an .npz file, an image folder, or 'mnist1d'")
        else:
            from ._npz import load_npz

            ds = load_npz(path, cfg)
    return validate(ds)
