"""Image folders in the torchvision ImageFolder layout: root/<class>/<image>."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import CompressError
from .dataset import Dataset, stratified_split

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image file, class index)]) of an image folder laid out as root/<class>/<image>, both sorted."""
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


# How each PIL mode becomes pixels in [0, 1]. 8-bit modes go through PIL's own conversion to L or RGB (the luma of
# ITU-R 601-2 for grey; palettes and CMYK, YCbCr, LAB, HSV to RGB) and are divided by 255. Alpha is dropped, keeping
# the stored colour as torchvision's loader does. 16-bit greyscale (I;16 and its byte orders, and 32-bit integer images,
# which PIL uses for 16-bit data) is divided by 65535, so 8- and 16-bit images in one folder share the [0, 1] scale;
# PIL's .convert("L") would clip every value above 255 instead. Float images (F) must already lie in [0, 1].
GREY_MODES = {"1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
MAX_16BIT = 65535


@contextlib.contextmanager
def _pixel_limit(limit: int | None):
    """PIL's own decompression-bomb guard handed over to _open's while the folder is read: the same check at the same
    point (the header, before any pixel is decoded), but at --max-image-pixels and naming the file in one line."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


ORIENTATION = 0x0112  # the EXIF tag; 5-8 are quarter turns (width and height swap)


def _orientation(im) -> int:
    """The EXIF orientation (1: as stored); a damaged EXIF block counts as none, the pixels may still be fine."""
    try:
        return int(im.getexif().get(ORIENTATION, 1))
    except Exception:
        return 1


def _too_big(what: str, pixels: int, limit: int | None) -> CompressError | None:
    if limit is None or pixels <= limit:
        return None
    return CompressError(f"{what} is {pixels:,} pixels, over the limit of {limit:,} (--max-image-pixels)",
                         hint="a header this large is usually a decompression bomb; for a real image that large, shrink it "
                              "or raise --max-image-pixels")


def _open(f, limit: int | None, name=None):
    """The image at f (a path, or a file object named `name`), opened lazily (header only) and checked against the pixel
    limit before any pixel is decoded (call inside _pixel_limit)."""
    from PIL import Image, UnidentifiedImageError

    name = f if name is None else name
    try:
        im = Image.open(f)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CompressError(f"cannot read image {name}: {exc}", hint="remove or replace the file") from None
    err = _too_big(f"image {name} ({im.size[0]}x{im.size[1]})", im.size[0] * im.size[1], limit)
    if err is not None:
        im.close()
        raise err
    return im


def _fit(im, size: tuple[int, int], resize: int | None, limit: int | None = None, name=None):
    """The PIL image at `size` (H, W): resized to it (bilinear); or, with resize, its shorter side scaled to `resize`
    (bilinear) and the centre `size` cut out, the usual ImageNet evaluation transform."""
    from PIL import Image

    hw = (size[1], size[0])
    if resize is None:
        return im if im.size == hw else im.resize(hw, Image.BILINEAR)
    w, h = im.size
    scale = resize / min(w, h)
    nw, nh = max(hw[0], round(w * scale)), max(hw[1], round(h * scale))
    err = _too_big(f"--resize {resize} scales image {name} ({w}x{h}) to {nw}x{nh}, which", nw * nh, limit)
    if err is not None:  # the scaled copy is made before the crop: a huge --resize is a decompression bomb of its own
        raise err
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - hw[0]) // 2, (nh - hw[1]) // 2
    return im.crop((left, top, left + hw[0], top + hw[1]))


def _pixels(im, f: Path, size: tuple[int, int], channels: int, resize: int | None = None, limit: int | None = None) -> np.ndarray:
    """One image as float32 (channels, H, W) in [0, 1], EXIF-oriented, at `size` (bilinear; see _fit for resize)."""
    from PIL import Image, ImageOps

    if _orientation(im) != 1:  # most files have none: skip exif_transpose's copy
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in HIGH_BIT_MODES:
        a = np.asarray(im)
        if mode == "F":
            if not np.isfinite(a).all() or a.min(initial=0) < 0 or a.max(initial=0) > 1:
                raise CompressError(f"image {f} holds floats (mode F) from {np.nanmin(a):.4g} to {np.nanmax(a):.4g}; only [0, 1] has a known scale",
                                    hint="save it scaled to [0, 1], or as an 8- or 16-bit image")
            a = a.astype(np.float32)
        else:
            if a.min(initial=0) < 0 or a.max(initial=0) > MAX_16BIT:
                raise CompressError(f"image {f} holds integers (mode {mode}) from {int(a.min())} to {int(a.max())}, outside 0..65535; "
                                    "their scale is unknown", hint="save it as an 8- or 16-bit image")
            a = a.astype(np.float32) / MAX_16BIT
        g = _fit(Image.fromarray(np.ascontiguousarray(a, np.float32)), size, resize, limit, f)  # mode F: bilinear in float, no 8-bit rounding
        a = np.asarray(g, np.float32)[None]
        return np.repeat(a, 3, axis=0) if channels == 3 else a
    if mode not in EIGHT_BIT_MODES:
        raise CompressError(f"image {f} has PIL mode {mode}, which this tool does not read", hint="save it as 8- or 16-bit greyscale, RGB or RGBA")
    if mode in ("P", "PA", "RGBa"):  # a palette's transparency and premultiplied alpha need RGBA on the way to RGB or L
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    im = _fit(im.convert("L" if channels == 1 else "RGB"), size, resize, limit, f)
    a = np.asarray(im, np.float32) / 255.0
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _normalisation(cfg: DataConfig, channels: int):
    """(mean, std) shaped (C, 1, 1) from --mean/--std, or None when neither is given."""
    if cfg.mean is None and cfg.std is None:
        return None
    mean = np.asarray(cfg.mean if cfg.mean is not None else [0.0] * channels, np.float32).reshape(-1, 1, 1)
    std = np.asarray(cfg.std if cfg.std is not None else [1.0] * channels, np.float32).reshape(-1, 1, 1)
    if mean.shape[0] not in (1, channels) or std.shape[0] not in (1, channels) or (std <= 0).any():
        raise CompressError(f"--mean/--std need 1 or {channels} values, std > 0")
    return mean, std


class ImageDecoder:
    """Image i of a fixed list of files as float32 (channels, *size), scaled to [0, 1] then --mean/--std. The paths are
    kept in one bytes array, not a list of Python strings: DataLoader workers that only read them never copy the pages
    that hold them (a list's reference counts would be written to, page by page, in every worker)."""

    def __init__(self, files, size: tuple[int, int], channels: int, cfg: DataConfig):
        self.files = np.array([os.fsencode(str(f)) for f in files]) if len(files) else np.zeros(0, "S1")
        # --crop without --resize: the shorter side scaled to the crop's side, then the centre square (no squashing)
        resize = cfg.resize if cfg.resize is not None else cfg.crop
        self.size, self.channels, self.resize, self.limit = tuple(size), channels, resize, cfg.max_image_pixels
        self.norm = _normalisation(cfg, channels)

    def source(self, i: int):
        """(what to open: a path or a file object, its name in messages) for image i."""
        f = Path(os.fsdecode(self.files[i]))
        return f, f

    def __call__(self, i: int) -> np.ndarray:
        src, name = self.source(i)
        if READ_LOG:
            _log_read(name)
        with _pixel_limit(self.limit):
            try:
                with _open(src, self.limit, name) as im:
                    a = _pixels(im, name, self.size, self.channels, self.resize, self.limit)
            except CompressError:
                raise
            except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data, found while decoding
                raise CompressError(f"cannot read image {name}: {exc}", hint="remove or replace the file") from None
        if self.norm is not None:
            a = (a - self.norm[0]) / self.norm[1]
        return a


# COMPRESSOR_READ_LOG=FILE: every decode appends "<torchrun rank> <file>" to FILE (how many reads, and by which rank)
READ_LOG = os.environ.get("COMPRESSOR_READ_LOG")


def _log_read(f: Path) -> None:
    line = f"{os.environ.get('RANK', '0')} {f}\n".encode("utf-8", "backslashreplace")
    fd = os.open(READ_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one O_APPEND write per line: lines from several processes never interleave
    finally:
        os.close(fd)


def read_images(items, size: tuple[int, int], channels: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) for [(image file, class index)] decoded into memory at once: pixels (N, channels, *size) in [0, 1] (then
    --mean/--std), int64 labels. The pipeline streams instead (image_rows); this is for small sets and measurements."""
    dec = ImageDecoder([f for f, _ in items], size, channels, cfg)
    x = np.empty((len(items), channels, size[0], size[1]), np.float32)
    for n in range(len(items)):
        x[n] = dec(n)
    return x, np.asarray([c for _, c in items], np.int64)


def image_rows(files, size: tuple[int, int], channels: int, cfg: DataConfig):
    """The images as a LazyRows (N, channels, *size) float32, decoded when read (in DataLoader workers for batches)."""
    from .streaming import LazyRows

    return LazyRows(ImageDecoder(files, size, channels, cfg), len(files), (channels, *size), workers=cfg.workers)


def scan_unlabeled(dirs, data_root: Path) -> list[Path]:
    """Every image below each --unlabeled folder (any nesting, no class folders), sorted; a folder inside the labeled
    --data (where it would be read as a class) or holding it is refused, and so is one without images."""
    files = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise CompressError(f"--unlabeled {p} {'does not exist' if not p.exists() else 'is not a folder'}", hint="give a folder of images")
        a, b = p.resolve(), data_root.resolve()
        if a == b or b in a.parents or a in b.parents:
            raise CompressError(f"--unlabeled {p} overlaps the labeled --data {data_root}: its images would be read twice, or as a class",
                                hint="keep unlabeled images in a folder beside the labeled one, e.g. data/train and data/unlabeled")
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise CompressError(f"--unlabeled {p} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files += found
    return files


HEADER_THREADS = 8  # files whose headers are read at once: on a network file system each open waits on the server


def _check_headers(files, limit: int | None) -> None:
    """Open every image's header (no pixels decoded): a file that is no image, or a decompression bomb, is refused now,
    not an hour into training. 3 s for 20,500 local JPEGs; threads overlap the waits of a network file system. The
    first bad file in the folder's order is the one reported."""
    from concurrent.futures import ThreadPoolExecutor

    def one(f):
        _open(Path(f), limit).close()
    with _pixel_limit(limit), ThreadPoolExecutor(HEADER_THREADS) as pool:
        for _ in pool.map(one, files):  # map re-raises the first failure in order
            pass


def check_headers_of(decoder, n: int, limit: int | None) -> None:
    """_check_headers for images a decoder finds (decoder.source(i) -> a path or file object, its name)."""
    with _pixel_limit(limit):
        for i in range(n):
            src, name = decoder.header(i) if hasattr(decoder, "header") else decoder.source(i)
            _open(src, limit, name).close()


def image_geometry(cfg: DataConfig, teacher_input_shape: tuple | None, first, first_name=None) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)): flags first (--crop M is M x M), then the teacher's declared input (N, C, H, W), then the first image."""
    if cfg.crop is not None and cfg.image_size:
        raise CompressError("give either --image-size or --crop, not both", hint="--resize N --crop M is the ImageNet evaluation transform; --image-size HxW a plain resize")
    channels = cfg.channels
    size = (cfg.crop, cfg.crop) if cfg.crop is not None else tuple(cfg.image_size) if cfg.image_size else None
    if teacher_input_shape is not None and len(teacher_input_shape) == 4:
        c, h, w = teacher_input_shape[1:]
        channels = channels or (c if isinstance(c, int) else None)
        if size is None and isinstance(h, int) and isinstance(w, int):
            size = (h, w)
    if cfg.resize is not None and size is None:
        raise CompressError("--resize needs --crop (or a teacher that declares its input size)", hint="e.g. --resize 256 --crop 224")
    if channels is None or size is None:
        with _pixel_limit(cfg.max_image_pixels), _open(first, cfg.max_image_pixels, first_name) as im:
            channels = channels or (1 if im.mode in GREY_MODES else 3)
            # the size after EXIF orientation: a quarter turn swaps width and height
            turned = _orientation(im) in (5, 6, 7, 8)
            size = size or ((im.size[0], im.size[1]) if turned else (im.size[1], im.size[0]))
    if channels not in (1, 3):
        raise CompressError(f"--channels must be 1 or 3, got {channels}")
    err = _too_big(f"the image size {size[0]}x{size[1]} (HxW, from --image-size, --crop, the teacher's input or the first image)",
                   size[0] * size[1], cfg.max_image_pixels)
    if err is not None:  # every image is resized to it: a size over the limit is refused like an image over it
        raise err
    return channels, size


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
    """The folder's images (and the --unlabeled ones, label -1) as rows decoded on demand, never held in memory as floats;
    held out: a sibling test/ (or --eval-data) folder, else a stratified split of the labeled images."""
    root = Path(cfg.source)
    classes, items = scan_image_folder(root)
    unlabeled = scan_unlabeled(cfg.unlabeled or [], root)
    channels, size = image_geometry(cfg, teacher_input_shape, items[0][0])
    files = [f for f, _ in items] + unlabeled
    y = np.asarray([c for _, c in items] + [-1] * len(unlabeled), np.int64)
    held_root = _heldout_root(root, cfg)
    held_items = []
    if held_root is not None:
        held_classes, held_items = scan_image_folder(held_root)
        unknown = set(held_classes) - set(classes)
        if unknown:
            raise CompressError(f"held-out folder {held_root} has classes not in {root}: {sorted(unknown)}")
        remap = {i: classes.index(c) for i, c in enumerate(held_classes)}
        held_items = [(f, remap[c]) for f, c in held_items]
    _check_headers(files + [f for f, _ in held_items], cfg.max_image_pixels)
    x = image_rows(files, size, channels, cfg)
    if held_root is not None:
        xt = image_rows([f for f, _ in held_items], size, channels, cfg)
        return Dataset(x, y, xt, np.asarray([c for _, c in held_items], np.int64), "folder", str(root), class_names=classes)
    keep, held = stratified_split(y, cfg.heldout_fraction, cfg.seed)
    if len(held) == 0:
        raise CompressError(f"image folder {root}: too few images to hold any out", hint="add a sibling test/ folder or --eval-data")
    keep = np.sort(np.concatenate([keep, np.flatnonzero(y < 0)]))  # unlabeled images all stay in the training pool
    return Dataset(x.take(keep), y[keep], x.take(held), y[held], "split", str(root), class_names=classes)
