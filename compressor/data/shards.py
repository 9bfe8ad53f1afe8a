"""WebDataset tar shards: `--data 'shards/train-{000000..000099}.tar'`, the layout webdataset's ShardWriter (and `tar`
over a sorted folder) writes: the files of one sample share a key (the path up to the first dot of the name) and differ
in extension, e.g. 000123.jpg and 000123.cls. Each sample needs one image (.jpg, .png, …); a .cls (or .class, .label)
holding an integer is its class, and a sample without one is unlabeled (y = -1), the pool the teacher labels softly.

The shards are indexed once from their tar headers (names, offsets and sizes; no pixel is read) and each image is read
by seeking to its bytes, so they stream like an image folder: any row decoded on demand in DataLoader workers, the
teacher's pass and each training batch split across torchrun ranks, every rank reading only its rows. That needs
seekable files (a local disk or a shared file system, not a pipe from object storage) and uncompressed .tar (gzip
cannot seek): the seeded, resumable batches and the equality of 1- and N-process runs are built on random access."""
from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import CompressError
from .dataset import Dataset, stratified_split
from .image_folder import IMAGE_EXTENSIONS, ImageDecoder, check_headers_of, image_geometry

MAX_SHARDS = 100_000
HEADER_BYTES = 256 << 10  # read of each image by the check before training: its header, not its pixels
LABEL_EXTENSIONS = ("cls", "class", "label")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key = up to the first dot of the file name


def is_shard_spec(source) -> bool:
    """True for a WebDataset shard list: a path (or brace pattern) ending in .tar."""
    return isinstance(source, str) and source != "mnist1d" and source.endswith(".tar")


_RANGE = re.compile(r"\{(-?\d+|[A-Za-z])\.\.(-?\d+|[A-Za-z])(?:\.\.(-?\d+))?\}")
_LIST = re.compile(r"\{[^{}]*,[^{}]*\}")


def _names_count(spec: str) -> int:
    """How many names a brace pattern expands to, counted without expanding it (braceexpand builds a range's every name
    at once, so 'x-{0..99999999999}.tar' would take the machine's memory); nested braces count their outer group only
    as a lower bound and are rare in shard lists."""
    n = 1
    for m in _RANGE.finditer(spec):
        a, b, step = m.group(1), m.group(2), abs(int(m.group(3) or 1)) or 1
        lo, hi = (int(a), int(b)) if a.lstrip("-").isdigit() and b.lstrip("-").isdigit() else (ord(a[0]), ord(b[0]))
        n *= abs(hi - lo) // step + 1
    for m in _LIST.finditer(spec):
        n *= m.group(0).count(",") + 1
    return n


def expand(spec: str) -> list[Path]:
    """The shard files a spec names ('a-{000..009}.tar', 'a-{x,y}.tar' or one path), each checked to be a regular file."""
    from braceexpand import braceexpand

    if _names_count(spec) > MAX_SHARDS or spec.count("{") > 8:
        raise CompressError(f"--data {spec} names more than {MAX_SHARDS:,} shards", hint="use fewer, larger shards")
    try:
        names = []
        for n in braceexpand(spec):
            names.append(n)
            if len(names) > MAX_SHARDS:
                raise CompressError(f"--data {spec} names more than {MAX_SHARDS:,} shards", hint="use fewer, larger shards")
    except (ValueError, OverflowError) as exc:
        raise CompressError(f"--data {spec}: cannot expand the shard pattern ({exc})", hint="e.g. 'shards/train-{000000..000099}.tar'") from None
    paths = [Path(n) for n in names]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise CompressError(f"{len(missing)} of the {len(paths)} shards --data {spec} names do not exist (first: {missing[0]})",
                            hint="check the pattern's range against the files")
    for p in paths:
        if not p.is_file():
            raise CompressError(f"shard {p} (from --data {spec}) is not a regular file", hint="shards must be .tar files on a disk or shared file system")
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise CompressError(f"--data {spec} names a shard twice", hint="each shard's samples would be read twice")
    return paths


class _Sample:
    __slots__ = ("image", "label")

    def __init__(self):
        self.image, self.label = None, None


def _label(shard: Path, name: str, raw: bytes) -> int:
    try:
        v = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CompressError(f"shard {shard}: {name} holds {raw[:40]!r}, not an integer class",
                            hint="a .cls member holds the class index as text, e.g. b'3' (-1 or no .cls: unlabeled)") from None
    if v < -1 or v > 2**31 - 1:
        raise CompressError(f"shard {shard}: {name} holds class {v}; classes are 0, 1, … (-1: unlabeled)")
    return v


def scan_shard(path: Path) -> list[tuple[str, int, int, int]]:
    """[(key, offset of the image's bytes, their size, class or -1)] of one shard, in the order its samples appear."""
    samples: dict[str, _Sample] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                hit = _KEY.match(m.name)
                if hit is None:
                    continue
                key, ext = hit.group(1), hit.group(2).lower()
                s = samples.setdefault(key, _Sample())
                if ext in LABEL_EXTENSIONS:
                    if m.size > 64:
                        raise CompressError(f"shard {path}: {m.name} is {m.size} bytes, too large for a class index")
                    s.label = _label(path, m.name, tf.extractfile(m).read())
                elif "." + ext in IMAGE_EXTENSIONS:
                    if s.image is not None:
                        raise CompressError(f"shard {path}: sample {key} has two images ({s.image[2]} and {ext})",
                                            hint="keep one image per sample key")
                    s.image = (m.offset_data, m.size, ext)
    except tarfile.ReadError as exc:
        if "unexpected end" in str(exc):
            raise CompressError(f"shard {path} ends in the middle of a file: it is cut short ({exc})",
                                hint="copy or write the shard again") from None
        raise CompressError(f"shard {path} is not an uncompressed tar file ({exc})",
                            hint="write shards as plain .tar (webdataset's ShardWriter does): a compressed tar cannot be read at random") from None
    except OSError as exc:
        raise CompressError(f"cannot read shard {path}: {exc}") from None
    out = []
    for key, s in samples.items():
        if s.image is None:
            raise CompressError(f"shard {path}: sample {key} has no image ({', '.join(sorted(IMAGE_EXTENSIONS))})",
                                hint="every sample needs one image; a sample without a .cls is unlabeled")
        out.append((key, s.image[0], s.image[1], -1 if s.label is None else s.label))
    return out


class ShardDecoder(ImageDecoder):
    """Image i of the samples of a list of shards: its bytes read at their offset (one open file per shard and process)."""

    def __init__(self, shards: list[Path], index: np.ndarray, size, channels: int, cfg: DataConfig):
        super().__init__([], size, channels, cfg)
        self.shards = np.array([os.fsencode(str(p)) for p in shards])
        self.index = index  # structured: shard, offset, size, key
        self._fh, self._pid = {}, None

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked worker opens its own handles
            self._fh, self._pid = {}, os.getpid()
        fh = self._fh.get(shard)
        if fh is None:
            if len(self._fh) >= 64:  # bounded: a pass over thousands of shards keeps few open
                for old in self._fh.values():
                    old.close()
                self._fh.clear()
            fh = self._fh[shard] = open(os.fsdecode(self.shards[shard]), "rb")
        return fh

    def header(self, i: int):
        """Like source(i) with only the first HEADER_BYTES of a large image: enough for its header (the format, the size),
        which is all a check before training opens; the whole image when its header lies further in."""
        from PIL import Image

        src, name = self.source(i, HEADER_BYTES)
        data = src.getvalue()
        if int(self.index[i]["size"]) > HEADER_BYTES:
            try:
                Image.open(io.BytesIO(data)).close()
            except Exception:
                return self.source(i)
        return io.BytesIO(data), name

    def source(self, i: int, limit: int | None = None):
        r = self.index[i]
        shard = int(r["shard"])
        name = f"{os.fsdecode(self.shards[shard])}:{r['key'].decode('utf-8', 'replace')}"
        fh = self._file(shard)
        fh.seek(int(r["offset"]))
        want = int(r["size"]) if limit is None else min(limit, int(r["size"]))
        data = fh.read(want)
        if len(data) != want:
            raise CompressError(f"shard {os.fsdecode(self.shards[shard])} ends inside {name}: the file changed or was cut short",
                                hint="rewrite the shard, or start a new run")
        return io.BytesIO(data), name

    def __getstate__(self):  # file handles stay in the process that opened them
        state = dict(self.__dict__)
        state["_fh"], state["_pid"] = {}, None
        return state


def index_shards(spec: str) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """(shard paths, a structured index of every sample: shard, offset, size, key; their labels, -1 = unlabeled)."""
    shards = expand(spec)
    rows, labels = [], []
    for n, p in enumerate(shards):
        for key, off, size, label in scan_shard(p):
            rows.append((n, off, size, key.encode("utf-8", "surrogateescape")))
            labels.append(label)
    if not rows:
        raise CompressError(f"--data {spec}: the shards hold no samples")
    width = max(len(r[3]) for r in rows)
    index = np.array(rows, dtype=[("shard", np.int32), ("offset", np.int64), ("size", np.int64), ("key", f"S{width}")])
    return shards, index, np.asarray(labels, np.int64)


def _rows(spec: str, cfg: DataConfig, teacher_input_shape, geometry=None):
    from .streaming import LazyRows

    shards, index, y = index_shards(spec)
    probe = ShardDecoder(shards, index, (1, 1), 1, cfg)
    channels, size = geometry or image_geometry(cfg, teacher_input_shape, *probe.source(0))
    dec = ShardDecoder(shards, index, size, channels, cfg)
    check_headers_of(dec, len(index), cfg.max_image_pixels)
    return LazyRows(dec, len(index), (channels, *size), workers=cfg.workers), y, (channels, size)


def first_sample_decoder(spec: str, size, channels: int, cfg: DataConfig) -> tuple[ShardDecoder, str]:
    """(a decoder whose row 0 is the first sample of the first shard, that sample's name): reads one shard's headers."""
    shards = expand(spec)[:1]
    key, off, n, _ = scan_shard(shards[0])[0]
    index = np.array([(0, off, n, key.encode("utf-8", "surrogateescape"))],
                     dtype=[("shard", np.int32), ("offset", np.int64), ("size", np.int64), ("key", f"S{max(1, len(key.encode()))}")])
    return ShardDecoder(shards, index, size, channels, cfg), f"{shards[0]}:{key}"


def shard_fingerprint(spec: str) -> list:
    """What identifies the shards without reading them: each file's name, size and modification time."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in expand(spec)]


def load_shards(cfg: DataConfig, teacher_input_shape: tuple | None) -> Dataset:
    """The shards' samples as rows decoded on demand (labels from .cls; none: unlabeled); held out: --eval-data shards,
    else a stratified split of the labeled samples."""
    if cfg.unlabeled:
        raise CompressError("--unlabeled takes image folders, but --data is a list of shards",
                            hint="put the unlabeled images in shards too, as samples without a .cls: they join the pool unlabeled")
    x, y, geo = _rows(cfg.source, cfg, teacher_input_shape)
    if cfg.eval_source:
        if not is_shard_spec(cfg.eval_source):
            raise CompressError(f"--eval-data {cfg.eval_source} is not a shard list (…tar), but --data is", hint="give the held-out samples as shards too")
        both = {p.resolve() for p in expand(cfg.source)} & {p.resolve() for p in expand(cfg.eval_source)}
        if both:
            raise CompressError(f"--eval-data and --data name the same shard ({sorted(both)[0]}): its samples would be trained on and "
                                "held out at once", hint="keep the held-out samples in shards of their own")
        xt, yt, _ = _rows(cfg.eval_source, cfg, teacher_input_shape, geo)
        if (yt < 0).any():
            raise CompressError(f"--eval-data {cfg.eval_source}: {int((yt < 0).sum())} samples have no class (.cls); every held-out sample needs one")
        return Dataset(x, y, xt, yt, "shards", cfg.source)
    keep, held = stratified_split(y, cfg.heldout_fraction, cfg.seed)
    if len(held) == 0:
        raise CompressError(f"--data {cfg.source}: too few labeled samples to hold any out", hint="add --eval-data shards, or label more samples")
    keep = np.sort(np.concatenate([keep, np.flatnonzero(y < 0)]))
    return Dataset(x.take(keep), y[keep], x.take(held), y[held], "split", cfg.source)
