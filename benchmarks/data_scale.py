"""Real-scale image data: the tool's `compress distill` against a plain PyTorch DataLoader loop, on folders of
JPEG photos of growing size; peak memory (PSS over the process tree), teacher-pass images/s and training steps/s.

    python benchmarks/data_scale.py --sizes 5000,20000 --labeled 2000 --steps 100 --batch-size 64 --workers 2
    python benchmarks/data_scale.py --smoke --out /tmp/ds      # 128 images, ~2-3 minutes on 2 cores

Results: benchmarks/results/data_scale.{md,json} (with --smoke: under --out only).

Data (generated here, no downloads): JPEGs of 256-400 px a side (random sizes and aspect ratios), each a random crop
(20-100 % of the area), small rotation, horizontal flip, colour jitter and rescale of one of ten photos shipped in
scikit-image (`skimage.data`); the class is the source photo. Layout per size N: ROOT/train/<class>/*.jpg (--labeled
images), ROOT/unlabeled/<nnn>/*.jpg (the rest, N - labeled) and ROOT/test/<class>/*.jpg (--test images). Images are
a pure function of (seed, split, index), made by 2 processes and cached by size under --cache, so re-runs reuse them
(and a new size hard-links the images it shares with the largest cached one).

Teacher: an EfficientNet-B0-like network written here (MBConv + squeeze-excite, SiLU; ~4.0M parameters and ~0.39
GMACs at 224x224, 10 classes). NOT a pretrained ImageNet model: its weights are random, its BatchNorm statistics are
calibrated on up to 256 of the labeled images, and only its last layer (the linear classifier) is trained, for --teacher-steps steps
on the pooled features of the labeled images (features computed once, so this takes one forward pass per image).
Random convolutional features separate these ten photos well enough for the teacher's logits to mean something; the
held-out accuracy is reported. Saved as TorchScript (torch.jit.trace). --teacher-width scales every layer's channels (0.35: 0.54M parameters, 61 MMACs,
about 4x the images/s on 2 cores), for large sizes on a small machine; the figures say which width ran.

Plain loop (the reference, run as a child process so it is measured like the tool): a torch Dataset over the image
paths (PIL decode, shorter side to 256, centre crop 224, ImageNet mean/std) and a DataLoader with --workers and
--batch-size; (a) the teacher over train + unlabeled into an np.memmap of logits (images/s), (b) --steps steps of a
0.3M-parameter MobileNet-style student (`student()` below, also handed to the tool) with KD: alpha*T^2*KL at T=4 plus
(1-alpha)*CE on labeled rows, the KD term alone on unlabeled rows, alpha 0.5, AdamW (steps/s).

Tool: `python -m compressor.cli distill ...` with the argv built by tool_argv(), which uses --unlabeled, --workers and
--resize/--crop when `distill --help` lists them and otherwise falls back to --image-size 224x224 without the unlabeled
folder (the results say which). Its figures come from the run's manifest.json.

Memory: a thread in this process samples /proc/<pid>/smaps_rollup of the child and all its descendants every 0.2 s;
the peak of the summed Pss (and, for comparison, of the summed Rss, which counts shared pages once per process).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA_VERSION = 1  # bump when the image recipe changes: the cache keys carry it

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224
TEMPERATURE, ALPHA = 4.0, 0.5
# class name -> skimage.data loader (all ship in the scikit-image wheel; none needs pooch or the network)
SOURCES = {
    "astronaut": "astronaut", "camera": "camera", "chelsea": "chelsea", "coffee": "coffee", "coins": "coins",
    "hubble": "hubble_deep_field", "ihc": "immunohistochemistry", "motorcycle": "stereo_motorcycle", "retina": "retina",
    "rocket": "rocket",
}
CLASSES = sorted(SOURCES)
FULL = dict(sizes="5000,20000", labeled=2000, test=1000, steps=100, batch_size=64, workers=2, teacher_steps=300)
SMOKE = dict(sizes="128", labeled=48, test=32, steps=8, batch_size=16, workers=2, teacher_steps=300)


# --- data ----------------------------------------------------------------------------------------------------------
_SRC: list | None = None


def _sources() -> list:
    """The ten source photos as RGB uint8 arrays, in CLASSES order (loaded once per process)."""
    global _SRC
    if _SRC is None:
        import skimage.data as sd

        out = []
        for name in CLASSES:
            a = getattr(sd, SOURCES[name])()
            a = a[0] if isinstance(a, tuple) else a  # stereo_motorcycle: (left, right, disparity)
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            out.append(np.ascontiguousarray(a[..., :3].astype(np.uint8)))
        _SRC = out
    return _SRC


def make_photo(src: np.ndarray, rng: np.random.Generator):
    """One JPEG-bound PIL image: crop, rotate, flip, colour jitter and rescale of `src`."""
    from PIL import Image, ImageEnhance

    h, w = src.shape[:2]
    area = rng.uniform(0.2, 1.0) * h * w
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw, ch = min(w, int(round((area * aspect) ** 0.5))), min(h, int(round((area / aspect) ** 0.5)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw])
    angle = float(rng.uniform(-20, 20))
    if abs(angle) > 1:  # rotate, then keep the centre that has no empty corners
        im = im.rotate(angle, resample=Image.BILINEAR)
        t = np.radians(abs(angle))
        s = 1.0 / (np.cos(t) + np.sin(t) * max(cw, ch) / min(cw, ch))
        kw, kh = max(8, int(cw * s)), max(8, int(ch * s))
        im = im.crop(((cw - kw) // 2, (ch - kh) // 2, (cw - kw) // 2 + kw, (ch - kh) // 2 + kh))
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
    a = np.asarray(im, np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)  # a slight tint
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return im.resize((int(rng.integers(256, 401)), int(rng.integers(256, 401))), Image.BICUBIC)


_SPLIT_CODE = {"train": 0, "unlabeled": 1, "test": 2}


def _write_one(task: tuple) -> int:
    """(folder, split, index, seed, donor): write that image, or hard-link the same file from the donor folder (another
    cached size: images depend on (seed, split, index) only); returns its bytes."""
    folder, split, i, seed, donor = task
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
    c = i % len(CLASSES) if split != "unlabeled" else int(rng.integers(len(CLASSES)))
    rel = Path(split) / (f"{i // 1000:03d}" if split == "unlabeled" else CLASSES[c]) / f"{i:06d}.jpg"
    path = Path(folder) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if donor and (Path(donor) / rel).exists():
        try:
            os.link(Path(donor) / rel, path)
        except OSError:
            shutil.copyfile(Path(donor) / rel, path)
    else:
        make_photo(_sources()[c], rng).save(path, quality=int(rng.integers(80, 96)))
    return path.stat().st_size


def make_dataset(cache: Path, total: int, labeled: int, test: int, seed: int, procs: int = 2) -> Path:
    """The cached folder for this size (made, by `procs` processes, when it is missing)."""
    import multiprocessing as mp

    if labeled > total:
        raise SystemExit(f"--labeled {labeled} is more than the size {total}")
    folder = cache / f"v{DATA_VERSION}-n{total}-l{labeled}-t{test}-s{seed}"
    if (folder / "done.json").exists():
        return folder
    tmp = cache / f".partial-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    same = [p for p in cache.glob(f"v{DATA_VERSION}-n*-l{labeled}-t{test}-s{seed}") if (p / "done.json").exists()]
    donor = str(max(same, key=lambda p: int(p.name.split("-")[1][1:]))) if same else None  # the largest cached size
    tasks = [(str(tmp), "train", i, seed, donor) for i in range(labeled)]
    tasks += [(str(tmp), "unlabeled", i, seed, donor) for i in range(total - labeled)]
    tasks += [(str(tmp), "test", i, seed, donor) for i in range(test)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs, initializer=_sources) as pool:  # spawn: no fork of a process using OpenMP
        nbytes = sum(pool.imap_unordered(_write_one, tasks, chunksize=16))
    info = {"train": labeled, "unlabeled": total - labeled, "test": test, "seed": seed, "bytes": nbytes,
            "seconds": round(time.perf_counter() - t0, 1), "classes": CLASSES}
    (tmp / "done.json").write_text(json.dumps(info, indent=2) + "\n")
    if folder.exists():  # another run finished it meanwhile
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, folder)
    print(f"data: {total} + {test} test JPEGs ({nbytes / 2**20:.0f} MiB) in {info['seconds']} s -> {folder}", flush=True)
    return folder


def list_images(root: Path) -> tuple[list[Path], np.ndarray]:
    """train/<class>/*.jpg (labels by sorted class name, as the tool reads them) then unlabeled/**/*.jpg (label -1)."""
    paths, labels = [], []
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    for c, name in enumerate(classes):
        for f in sorted((root / "train" / name).rglob("*.jpg")):
            paths.append(f)
            labels.append(c)
    if (root / "unlabeled").is_dir():
        for f in sorted((root / "unlabeled").rglob("*.jpg")):
            paths.append(f)
            labels.append(-1)
    return paths, np.asarray(labels, np.int64)


def load_image(path) -> torch.Tensor:
    """PIL decode, shorter side to 256 (bilinear), centre crop 224, float CHW normalised with ImageNet mean/std."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = RESIZE / min(w, h)
        im = im.resize((max(RESIZE, round(w * s)), max(RESIZE, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - CROP) // 2, (h - CROP) // 2
        im = im.crop((left, top, left + CROP, top + CROP))
        a = np.asarray(im, np.float32) / 255.0
    a = (a - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


class ImagePaths(torch.utils.data.Dataset):
    """(image tensor, row index) for each path."""

    def __init__(self, paths):
        self.paths = [str(p) for p in paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i]), i


# --- models --------------------------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, squeeze: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(ch, squeeze, 1), nn.Conv2d(squeeze, ch, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


def _cbn(i, o, k, s, groups=1, act=True):
    layers = [nn.Conv2d(i, o, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(o)]
    return layers + [nn.SiLU()] if act else layers


class MBConv(nn.Module):
    def __init__(self, i: int, o: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = i * expand
        layers = _cbn(i, mid, 1, 1) if expand != 1 else []
        layers += _cbn(mid, mid, k, stride, groups=mid)
        layers += [SqueezeExcite(mid, max(1, i // 4)), *_cbn(mid, o, 1, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.skip = stride == 1 and i == o

    def forward(self, x):
        y = self.block(x)
        return x + y if self.skip else y


class EfficientNetB0Like(nn.Module):
    """EfficientNet-B0's layout (Tan & Le 2019) without drop-connect: stem 32, seven MBConv stages, 1x1 head to 1280."""

    STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
              (6, 3, 1, 320, 1)]  # (expansion, kernel, stride, out channels, repeats)

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()

        def w(c):  # channels scaled by width, rounded to a multiple of 8 (width 1 is B0 itself)
            return max(8, int(c * width + 4) // 8 * 8)
        layers, ch = _cbn(3, w(32), 3, 2), w(32)
        for e, k, s, o, n in self.STAGES:
            for r in range(n):
                layers.append(MBConv(ch, w(o), e, k, s if r == 0 else 1))
                ch = w(o)
        layers += _cbn(ch, w(1280), 1, 1)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(w(1280), num_classes)

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


def _dsconv(i, o, s):
    return [nn.Conv2d(i, i, 3, s, 1, groups=i, bias=False), nn.BatchNorm2d(i), nn.ReLU(inplace=True),
            nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


class MobileStudent(nn.Module):
    """MobileNet-v1-style: stride-2 3x3 stem, depthwise-separable blocks down to 7x7, global pool, linear (~0.3M params)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        plan = [(24, 48, 2), (48, 96, 2), (96, 96, 1), (96, 192, 2), (192, 192, 1), (192, 384, 2), (384, 384, 1)]
        layers = [nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True)]
        for i, o, s in plan:
            layers += _dsconv(i, o, s)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(384, num_classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def student(num_classes: int = 10) -> nn.Module:
    """The student factory, for the plain loop and the tool (`--student benchmarks/data_scale.py:student`)."""
    return MobileStudent(num_classes)


def count_macs(model: nn.Module, size: int = CROP) -> int:
    """Multiply-accumulates of one 3 x size x size image through the convolutions and linear layers."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    model.train(was)
    for h in hs:
        h.remove()
    return total[0]


def n_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# --- teacher -------------------------------------------------------------------------------------------------------
def _batches(paths, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(ImagePaths(paths), batch_size=batch_size, num_workers=workers)


def build_teacher(data: Path, out: Path, *, steps: int, seed: int, workers: int, width: float = 1.0) -> dict:
    """Random EfficientNet-B0-like weights, BatchNorm calibrated on labeled images, linear head trained on their pooled
    features; saved traced at `out` (cached: returns the recorded info when `out` and its .json exist)."""
    info_path = out.with_suffix(".json")
    if out.exists() and info_path.exists():
        return json.loads(info_path.read_text())
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = EfficientNetB0Like(len(CLASSES), width)
    paths, y = list_images(data)
    keep = y >= 0
    paths, y = [p for p, k in zip(paths, keep) if k], y[keep]
    tpaths, ty = [], []
    for c, name in enumerate(CLASSES):
        for f in sorted((data / "test" / name).glob("*.jpg")):
            tpaths.append(f)
            ty.append(c)
    ty = np.asarray(ty)
    calib = np.random.default_rng(seed).permutation(len(paths))[:max(32, min(256, len(paths) // 8))]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for xb, _ in _batches([paths[i] for i in calib], 32, workers):
            model.embed(xb)
    model.eval()
    with torch.inference_mode():
        feats = torch.cat([model.embed(xb) for xb, _ in _batches(paths, 32, workers)])
        tfeats = torch.cat([model.embed(xb) for xb, _ in _batches(tpaths, 32, workers)])
    t_feat = time.perf_counter() - t0
    head = model.classifier
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    yt = torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(yt), (min(64, len(yt)),), generator=g)
        loss = F.cross_entropy(head(feats[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.inference_mode():
        train_acc = float((head(feats).argmax(1) == yt).float().mean())
        test_acc = float((head(tfeats).argmax(1).numpy() == ty).mean())
    traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, CROP, CROP))
    tmp = out.with_suffix(".tmp")
    torch.jit.save(traced, str(tmp))
    os.replace(tmp, out)
    arch = "EfficientNet-B0-like" + (f" at width {width:g}" if width != 1 else "")
    info = {"arch": f"{arch} (random init, BN calibrated, linear head trained)", "width": width, "pretrained": False,
            "params": n_params(model), "macs": count_macs(model), "classes": CLASSES, "head_steps": steps,
            "labeled_images": len(paths), "test_images": len(tpaths), "train_accuracy": train_acc, "test_accuracy": test_acc,
            "feature_seconds": round(t_feat, 1), "seconds": round(time.perf_counter() - t0, 1), "seed": seed}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


# --- the plain PyTorch loop (runs in a child process: `data_scale.py _plain ...`) ----------------------------------
def plain_loop(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="data_scale.py _plain")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    paths, labels = list_images(a.data)
    ds = ImagePaths(paths)
    teacher = torch.jit.load(str(a.teacher)).eval()
    num_classes = len(CLASSES)
    mm_path = a.out / "teacher_logits.f32"
    logits = np.memmap(mm_path, dtype=np.float32, mode="w+", shape=(len(ds), num_classes))

    # (a) teacher pass
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=False, num_workers=a.workers)
    with torch.inference_mode():
        for xb, ib in loader:
            logits[ib.numpy()] = teacher(xb).numpy()
    logits.flush()
    t_teacher = time.perf_counter() - t0
    del logits, loader, teacher
    logits = np.memmap(mm_path, dtype=np.float32, mode="r", shape=(len(ds), num_classes))

    # (b) training
    torch.manual_seed(a.seed)
    model = student(num_classes).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    y_all = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, drop_last=len(ds) >= a.batch_size,
                                         num_workers=a.workers, generator=g, persistent_workers=a.workers > 0)
    step, last_loss = 0, float("nan")
    while step < a.steps:
        for xb, ib in loader:
            s = model(xb)
            t = torch.from_numpy(np.asarray(logits[ib.numpy()]))  # the batch's rows of the memmap
            yb = y_all[ib]
            per_row = F.kl_div(F.log_softmax(s / TEMPERATURE, 1), F.log_softmax(t / TEMPERATURE, 1), reduction="none",
                               log_target=True).sum(1) * TEMPERATURE ** 2
            lab = yb >= 0
            if lab.any():
                ce = F.cross_entropy(s[lab], yb[lab], reduction="none")
                per_row = torch.cat([ALPHA * per_row[lab] + (1 - ALPHA) * ce, per_row[~lab]])
            loss = per_row.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last_loss = float(loss.detach())
            if step >= a.steps:
                break
    t_train = time.perf_counter() - t0
    res = {"images": len(ds), "labeled": int((labels >= 0).sum()), "teacher_pass_seconds": round(t_teacher, 3),
           "teacher_images_per_second": len(ds) / t_teacher, "steps": step, "train_seconds": round(t_train, 3),
           "steps_per_second": step / t_train, "last_loss": last_loss, "torch_threads": torch.get_num_threads(),
           "seconds": round(time.perf_counter() - t_start, 2)}
    (a.out / "result.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res), flush=True)


# --- memory: PSS summed over a process tree ------------------------------------------------------------------------
def _tree(root: int) -> list[int]:
    """root and every live descendant, from the parent pids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pss_rss_kb(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return pss, rss


class TreeMemory(threading.Thread):
    """Samples the summed Pss and Rss of a process tree every `interval` s until stop(); keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_pss_kb = self.peak_rss_kb = self.max_procs = self.samples = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            pids = _tree(self.pid)
            pss = rss = 0
            for p in pids:
                a, b = _pss_rss_kb(p)
                pss, rss = pss + a, rss + b
            self.peak_pss_kb, self.peak_rss_kb = max(self.peak_pss_kb, pss), max(self.peak_rss_kb, rss)
            self.max_procs, self.samples = max(self.max_procs, len(pids)), self.samples + 1
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run cmd (output to log) while sampling its process tree's memory; returns rc, wall time and the peaks (MB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        mon = TreeMemory(proc.pid)
        mon.start()
        rc = proc.wait()
        mon.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"  exited with {rc} after {wall:.1f} s; last lines of {log}:\n    " + "\n    ".join(tail), flush=True)
    return {"rc": rc, "wall_s": round(wall, 2), "peak_pss_mb": mon.peak_pss_kb / 1024, "peak_rss_sum_mb": mon.peak_rss_kb / 1024,
            "max_processes": mon.max_procs, "samples": mon.samples, "log": str(log)}


# --- the tool ------------------------------------------------------------------------------------------------------
def tool_help() -> str:
    r = subprocess.run([sys.executable, "-m", "compressor.cli", "distill", "--help"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout


def tool_argv(teacher: Path, data: Path, run_dir: Path, *, steps: int, batch_size: int, workers: int, help_text: str,
              seed: int = 0) -> tuple[list[str], dict, list[str]]:
    """The tool's command line, in one place because its flags are changing: (argv, {flag: used?}, notes).
    Uses --unlabeled DIR, --workers N and --resize 256 --crop 224 where `distill --help` lists them; otherwise
    --image-size 224x224 (a plain resize, no crop) and no unlabeled folder."""
    def has(flag):
        return f"{flag} " in help_text or f"{flag}\n" in help_text or f"{flag}," in help_text

    feats = {f: has(f) for f in ("--unlabeled", "--workers", "--resize", "--crop")}
    argv = [sys.executable, "-m", "compressor.cli", "distill", "--teacher", str(teacher), "--data", str(data / "train"),
            "--eval-data", str(data / "test"), "--target", "cpu", "--out", str(run_dir), "--steps", str(steps),
            "--batch-size", str(batch_size), "--no-baseline", "--skip-preflight", "--seed", str(seed),
            "--student", f"{HERE / 'data_scale.py'}:student", "--loss", "kd", "-T", f"{TEMPERATURE:g}", "--alpha", f"{ALPHA:g}",
            "--teacher-output", "logits", "--channels", "3", "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
    notes = []
    if feats["--resize"] and feats["--crop"]:
        argv += ["--resize", str(RESIZE), "--crop", str(CROP)]
    else:
        argv += ["--image-size", f"{CROP}x{CROP}"]
        notes.append(f"the tool has no --resize/--crop yet: it ran with --image-size {CROP}x{CROP} (each image resized to "
                     f"{CROP}x{CROP}, aspect not kept), the plain loop with shorter side {RESIZE} + centre crop {CROP}")
    if feats["--unlabeled"]:
        argv += ["--unlabeled", str(data / "unlabeled")]
    else:
        notes.append("the tool has no --unlabeled yet: it read only the labeled train/ images (its teacher pass and "
                     "training pool are those), while the plain loop used train/ + unlabeled/")
    if feats["--workers"]:
        argv += ["--workers", str(workers)]
    else:
        notes.append("the tool has no --workers yet: it decodes every image into memory in its main process before training")
    return argv, feats, notes


def tool_figures(run_dir: Path) -> dict:
    """Teacher-pass images/s and training steps/s from the run's manifest.json (stage distill)."""
    res = json.loads((run_dir / "manifest.json").read_text())["stages"]["distill"]["result"]
    d = res.get("data", {})
    rows = int(d.get("train_labeled", 0)) + int(d.get("train_unlabeled", 0))
    tp = float(res.get("teacher_pass_seconds") or 0.0)
    st = res["student"]
    return {"images": rows, "labeled": d.get("train_labeled"), "unlabeled": d.get("train_unlabeled"), "heldout": d.get("heldout"),
            "teacher_pass_seconds": tp, "teacher_pass": res.get("teacher_pass"),
            "teacher_images_per_second": rows / tp if tp > 0 else None, "steps": st["steps"], "train_seconds": st["seconds"],
            "steps_per_second": st.get("train_steps_per_second", st["steps_per_second"]),
            "steps_per_second_with_validation": st["steps_per_second"], "eval_seconds": st.get("eval_seconds"),
            "val_accuracy": st.get("val_accuracy")}


# --- the benchmark -------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    from compressor.bench.host import cpu_info, package_version

    mem = 0
    try:
        with open("/proc/meminfo") as fh:
            mem = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1]) // 1024
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": cpu_info()[0], "cores": os.cpu_count(), "memory_mb": mem, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__, "pillow": package_version("pillow"),
            "scikit-image": package_version("scikit-image"), "torch_threads": torch.get_num_threads(),
            "load_average_1m_start": os.getloadavg()[0]}


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _f(v, fmt="{:.1f}"):
    return "—" if v is None else fmt.format(v)


def bench_size(n: int, data: Path, teacher: Path, out: Path, args, help_text: str) -> dict:
    wdir = out / f"size-{n}"
    if wdir.exists():
        shutil.rmtree(wdir)
    plain_cmd = [sys.executable, HERE / "data_scale.py", "_plain", "--data", data, "--teacher", teacher, "--out", wdir / "plain",
                 "--steps", args.steps, "--batch-size", args.batch_size, "--workers", args.workers, "--seed", args.seed]
    plain = run_measured(plain_cmd, wdir / "plain.log")
    if plain["rc"] == 0:
        plain.update(json.loads((wdir / "plain" / "result.json").read_text()))
    argv, feats, notes = tool_argv(teacher, data, wdir / "tool-run", steps=args.steps, batch_size=args.batch_size,
                                   workers=args.workers, help_text=help_text, seed=args.seed)
    tool = run_measured(argv, wdir / "tool.log")
    if tool["rc"] == 0:
        tool.update(tool_figures(wdir / "tool-run"))
    tool.update(argv=[str(a) for a in argv[1:]], flags=feats, notes=notes)
    row = {"size": n, "labeled": args.labeled, "unlabeled": n - args.labeled, "data": str(data), "plain": plain, "tool": tool,
           "ratio": {k: _ratio(tool.get(k), plain.get(k))
                     for k in ("peak_pss_mb", "teacher_images_per_second", "steps_per_second", "wall_s")}}
    print(f"size {n}: plain peak PSS {plain['peak_pss_mb']:.0f} MB, {_f(plain.get('teacher_images_per_second'))} img/s, "
          f"{_f(plain.get('steps_per_second'), '{:.2f}')} steps/s | tool peak PSS {tool['peak_pss_mb']:.0f} MB, "
          f"{_f(tool.get('teacher_images_per_second'))} img/s, {_f(tool.get('steps_per_second'), '{:.2f}')} steps/s", flush=True)
    return row


def write_results(res: dict, md: Path) -> str:
    m, cfg, t, rows = res["machine"], res["config"], res["teacher"], res["rows"]
    notes = rows[0]["tool"]["notes"] if rows else []
    streams = bool(rows) and rows[0]["tool"]["flags"].get("--workers", False)
    lines = [
        "# Real-scale image data: `compress distill` vs a plain PyTorch DataLoader loop",
        "",
        f"Made by `{res['command']}` on {m['cpu']} ({m['cores']} cores, {m['memory_mb'] / 1024:.0f} GiB RAM), "
        f"torch {m['torch']}, {res['date']}{' (**smoke mode**: tiny sizes, not a measurement)' if cfg['smoke'] else ''}.",
        "",
        f"**Data.** Generated JPEGs, 256–400 px a side, random crops/rotations/flips/colour jitter/rescales of ten photos shipped "
        f"in scikit-image ({', '.join(CLASSES)}; the class is the source photo). Per size N: {cfg['labeled']:,} labeled images in "
        f"`train/<class>/`, N − {cfg['labeled']:,} in `unlabeled/`, {cfg['test']:,} in `test/<class>/`.",
        "",
        f"**Teacher.** {t['arch'].split(' (')[0]} network written in the benchmark, {t['params'] / 1e6:.2f}M parameters, "
        f"{t['macs'] / 1e9:.2f} GMACs at {CROP}×{CROP}, 10 classes. **Not a pretrained ImageNet model**: random weights, "
        f"BatchNorm statistics calibrated on up to 256 labeled images, and only the final linear layer trained ({t['head_steps']} "
        f"AdamW steps on pooled features): held-out accuracy {t['test_accuracy'] * 100:.1f}% on {t['test_images']} test images "
        f"(chance 10%). TorchScript (`torch.jit.trace`).",
        "",
        f"**Student.** `benchmarks/data_scale.py:student` (MobileNet-style, stride-2 stem, depthwise-separable blocks), "
        f"{res['student']['params']:,} parameters, {res['student']['macs'] / 1e6:.0f} MMACs; the same module in both. KD at "
        f"T={TEMPERATURE:g}, α={ALPHA:g} (KL on every row + CE on labeled rows), {cfg['steps']} steps at batch {cfg['batch_size']}, "
        f"{cfg['workers']} DataLoader workers.",
        "",
        "**Plain loop.** `torch.utils.data.Dataset` over the paths (PIL decode, shorter side 256, centre crop 224, ImageNet "
        "mean/std), `DataLoader(num_workers=workers)`; teacher logits of train + unlabeled into an `np.memmap`, then training "
        "from those logits. Run as a child process, measured like the tool.",
        "",
        "**Tool.** `" + " ".join(["python -m compressor.cli", *[a if not a.startswith("/") else Path(a).name for a in
                                                                  (rows[0]["tool"]["argv"][2:] if rows else [])]]) + "`",
        "",
        "**Memory.** Peak of the proportional set size (Pss, /proc/<pid>/smaps_rollup) summed over the process and all its "
        "descendants (DataLoader workers), sampled every 0.2 s; the Rss sum (shared pages counted once per process) beside it. "
        "Teacher images/s: rows through the teacher / seconds of the pass (the tool's from `teacher_pass_seconds` in its "
        "manifest" + ("" if streams else "; without --workers the tool decodes every image before that pass, so its pass "
                      "excludes decoding, while the plain loop's includes it") + "). Steps/s: the tool's "
        "`student.train_steps_per_second`: its steps without the time spent validating and writing checkpoints (the "
        "plain loop does neither; the JSON keeps the figure with them, `steps_per_second_with_validation`, and "
        "`eval_seconds`); the plain loop's from building the shuffled loader to the last step. The tool's wall time and memory also cover what the plain loop does not do: the teacher on "
        "the held-out images (its code-free copy), validation, checkpoints and the TorchScript student.",
        "",
    ]
    if notes:
        lines += ["**Flags.** " + "; ".join(notes) + ".", ""]
    for r in rows:
        p, tl, q = r["plain"], r["tool"], r["ratio"]
        lines += [
            f"### N = {r['size']:,} ({r['labeled']:,} labeled + {r['unlabeled']:,} unlabeled)",
            "",
            "| | peak PSS MB | peak RSS sum MB | processes | teacher pass img/s (images) | train steps/s | wall s |",
            "|---|---|---|---|---|---|---|",
            f"| plain loop | {p['peak_pss_mb']:.0f} | {p['peak_rss_sum_mb']:.0f} | {p['max_processes']} | "
            f"{_f(p.get('teacher_images_per_second'))} ({p.get('images', '—')}) | {_f(p.get('steps_per_second'), '{:.2f}')} | {p['wall_s']:.1f} |",
            f"| tool | {tl['peak_pss_mb']:.0f} | {tl['peak_rss_sum_mb']:.0f} | {tl['max_processes']} | "
            f"{_f(tl.get('teacher_images_per_second'))} ({tl.get('images', '—')}) | {_f(tl.get('steps_per_second'), '{:.2f}')} | {tl['wall_s']:.1f} |",
            f"| tool / plain | {_f(q['peak_pss_mb'], '{:.2f}')} | {_f(_ratio(tl['peak_rss_sum_mb'], p['peak_rss_sum_mb']), '{:.2f}')} | | "
            f"{_f(q['teacher_images_per_second'], '{:.2f}')} | {_f(q['steps_per_second'], '{:.2f}')} | {_f(q['wall_s'], '{:.2f}')} |",
            "",
        ]
        for who in ("plain", "tool"):
            if r[who]["rc"] != 0:
                lines += [f"The {who} run exited with {r[who]['rc']} (log: {r[who]['log']}).", ""]
    g = res.get("growth")
    if g:
        lines += [f"**Growth of peak PSS** from N = {g['from']:,} to N = {g['to']:,}: tool {g['tool_mb']:+.0f} MB "
                  f"(×{_f(g['tool_factor'], '{:.2f}')}), plain loop {g['plain_mb']:+.0f} MB (×{_f(g['plain_factor'], '{:.2f}')}).", ""]
    lines += [f"Load average (1 min) {m['load_average_1m_start']:.1f} at the start, {res['load_average_1m_end']:.1f} at the end on "
              f"{m['cores']} cores; total wall time {res['wall_s']:.0f} s."]
    text = "\n".join(lines) + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    md.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    return text


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        return plain_loop(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help=f"tiny defaults ({SMOKE}); results under --out only")
    ap.add_argument("--sizes", help=f"comma-separated totals of train + unlabeled images (default {FULL['sizes']})")
    ap.add_argument("--labeled", type=int, help=f"labeled images in train/ (default {FULL['labeled']})")
    ap.add_argument("--test", type=int, help=f"held-out images in test/ (default {FULL['test']})")
    ap.add_argument("--steps", type=int, help=f"student training steps (default {FULL['steps']})")
    ap.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']}")
    ap.add_argument("--workers", type=int, help=f"DataLoader workers (default {FULL['workers']})")
    ap.add_argument("--teacher-steps", type=int, help=f"steps of the teacher's head (default {FULL['teacher_steps']})")
    ap.add_argument("--teacher-width", type=float, default=1.0,
                    help="channel multiplier of the EfficientNet-B0-like teacher (default 1: B0's own widths; 0.35 runs ~4x faster)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="working folder (runs, logs; default runs/data_scale-<time>)")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "data_scale_cache", help="generated folders and teachers")
    ap.add_argument("--results", type=Path, help="the .md to write (default benchmarks/results/data_scale.md; --smoke: OUT/data_scale.md)")
    args = ap.parse_args()
    for k, v in (SMOKE if args.smoke else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    sizes = sorted(int(s) for s in str(args.sizes).split(","))
    out = (args.out or ROOT / "runs" / time.strftime("data_scale-%Y%m%d-%H%M%S")).resolve()
    results = args.results or (out / "data_scale.md" if args.smoke else HERE / "results" / "data_scale.md")
    out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = machine_info()

    folders = {n: make_dataset(args.cache, n, args.labeled, args.test, args.seed) for n in sizes}
    wtag = "" if args.teacher_width == 1 else f"-w{args.teacher_width:g}"
    tpath = args.cache / f"teacher-v{DATA_VERSION}-l{args.labeled}-t{args.test}-s{args.seed}-h{args.teacher_steps}{wtag}.pt"
    tinfo = build_teacher(folders[sizes[0]], tpath, steps=args.teacher_steps, seed=args.seed, workers=args.workers,
                          width=args.teacher_width)
    print(f"teacher: {tinfo['params']:,} params, {tinfo['macs'] / 1e9:.2f} GMACs, held-out accuracy "
          f"{tinfo['test_accuracy'] * 100:.1f}% ({tpath})", flush=True)
    s = student(len(CLASSES))
    help_text = tool_help()

    rows = [bench_size(n, folders[n], tpath, out, args, help_text) for n in sizes]
    growth = None
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = {"from": a["size"], "to": b["size"],
                  "tool_mb": b["tool"]["peak_pss_mb"] - a["tool"]["peak_pss_mb"], "tool_factor": _ratio(b["tool"]["peak_pss_mb"], a["tool"]["peak_pss_mb"]),
                  "plain_mb": b["plain"]["peak_pss_mb"] - a["plain"]["peak_pss_mb"], "plain_factor": _ratio(b["plain"]["peak_pss_mb"], a["plain"]["peak_pss_mb"])}
    res = {"command": "python benchmarks/data_scale.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
           "machine": machine, "config": {k: getattr(args, k) for k in ("smoke", "labeled", "test", "steps", "batch_size", "workers",
                                                                         "teacher_steps", "teacher_width", "seed")} | {"sizes": sizes},
           "teacher": tinfo | {"path": str(tpath)}, "student": {"params": n_params(s), "macs": count_macs(s)},
           "rows": rows, "growth": growth, "load_average_1m_end": os.getloadavg()[0], "wall_s": time.perf_counter() - t_start}
    print("\n" + write_results(res, results))
    print(f"written: {results} and {results.with_suffix('.json')}")


if __name__ == "__main__":
    main()
