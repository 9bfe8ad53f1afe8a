"""Image folders stream from disk: rows are decoded when read (in DataLoader workers for batches), never held in memory as
one float array; --unlabeled adds images without labels; --resize/--crop is the ImageNet evaluation transform."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from compressor.config import DataConfig
from compressor.data import load_data
from compressor.errors import CompressError


def _photo(path: Path, cls: int, i: int, size=(20, 16)):
    """A small RGB image whose colour pattern names its class (a bright stripe at a class-specific place), with noise."""
    from PIL import Image

    rng = np.random.default_rng(1000 * cls + i)
    a = (rng.random((size[1], size[0], 3)) * 60).astype(np.uint8)
    a[:, (cls * 5) % size[0]:(cls * 5) % size[0] + 4, cls % 3] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "RGB").save(path)


def _images(root: Path, n_per_class: int, classes: int = 3, unlabeled: int = 0, test: int = 4) -> Path:
    for c in range(classes):
        for i in range(n_per_class):
            _photo(root / "train" / f"c{c}" / f"{i}.png", c, i)
        for i in range(test):
            _photo(root / "test" / f"c{c}" / f"{i}.png", c, 500 + i)
    for i in range(unlabeled):
        _photo(root / "unlabeled" / f"batch{i % 3}" / f"{i}.jpg", i % classes, 900 + i)
    return root


def test_lazy_rows_index_like_the_array_they_stand_for(tmp_path):
    from compressor.data.image_folder import read_images, scan_image_folder

    root = _images(tmp_path, 4)
    ds = load_data(DataConfig(source=str(root / "train")))
    _, items = scan_image_folder(root / "train")
    full, y = read_images(items, (16, 20), 3, DataConfig())
    assert ds.x.shape == full.shape and ds.x.dtype == np.float32 and ds.y.tolist() == y.tolist()
    np.testing.assert_array_equal(ds.x[:3], full[:3])
    np.testing.assert_array_equal(ds.x[[5, 0, 2]], full[[5, 0, 2]])
    np.testing.assert_array_equal(ds.x[7], full[7])
    np.testing.assert_array_equal(ds.x[7, 1], full[7, 1])
    np.testing.assert_array_equal(ds.x.take([3, 1])[1], full[1])
    np.testing.assert_array_equal(np.asarray(ds.x), full)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_decoded_in_workers_equal_the_array(tmp_path, workers):
    from compressor.data.streaming import iter_batches

    root = _images(tmp_path, 10)
    ds = load_data(DataConfig(source=str(root / "train"), workers=workers))
    got = np.concatenate(list(iter_batches(ds.x, 7)))
    np.testing.assert_array_equal(got, np.asarray(ds.x))


def test_a_corrupt_image_found_by_a_worker_is_one_clean_error(tmp_path):
    from compressor.data.streaming import iter_batches

    root = _images(tmp_path, 10)
    bad = root / "train" / "c1" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header survives (the scan passes), the pixels are cut off
    ds = load_data(DataConfig(source=str(root / "train"), workers=2))
    with pytest.raises(CompressError) as err:
        for _ in iter_batches(ds.x, 4):
            pass
    assert "cannot read image" in err.value.message and "3.png" in err.value.message and "\n" not in err.value.message


def test_loading_a_folder_holds_no_float_array_of_it(tmp_path):
    """300 images at 128x128 would be 59 MB as float32; scanning them allocates a small fraction of that (paths, headers)."""
    from PIL import Image

    for i in range(300):
        p = tmp_path / "train" / f"c{i % 2}" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((128, 128, 3), i % 250, np.uint8)).save(p)
    tracemalloc.start()
    ds = load_data(DataConfig(source=str(tmp_path / "train")))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    full = (len(ds.y) + len(ds.y_test)) * 3 * 128 * 128 * 4
    assert ds.x.shape[1:] == (3, 128, 128) and peak < full / 20, (peak, full)


def test_unlabeled_folders_join_the_pool_with_label_minus_one(tmp_path):
    root = _images(tmp_path, 4, unlabeled=7)
    ds = load_data(DataConfig(source=str(root / "train"), unlabeled=[str(root / "unlabeled")]))
    assert len(ds.y) == 12 + 7 and (ds.y == -1).sum() == 7 and len(ds.y_test) == 12
    assert ds.summary()["train_unlabeled"] == 7 and ds.summary()["train_labeled"] == 12
    # without a test folder: the held-out rows come from the labeled images only, every unlabeled one stays in the pool
    (root / "test").rename(root / "elsewhere")
    ds = load_data(DataConfig(source=str(root / "train"), unlabeled=[str(root / "unlabeled")]))
    assert (ds.y == -1).sum() == 7 and (ds.y_test >= 0).all()


@pytest.mark.parametrize("where", ["inside", "missing", "empty", "same"])
def test_bad_unlabeled_folders_are_refused(tmp_path, where):
    root = _images(tmp_path, 3, unlabeled=3)
    path = {"inside": root / "train" / "c0", "missing": root / "nope", "same": root / "train"}.get(where, root / "empty")
    if where == "empty":
        path.mkdir()
    with pytest.raises(CompressError, match="--unlabeled"):
        load_data(DataConfig(source=str(root / "train"), unlabeled=[str(path)]))


def test_a_huge_resize_is_refused_like_a_decompression_bomb(tmp_path):
    """--resize scales the whole image before the crop: --resize 100000 would make a 100000 x 125000 copy of a 20x16
    image (12.5 G pixels); it is refused by --max-image-pixels with the image's name, as a bomb's header is."""
    root = _images(tmp_path / "d", 2)
    ds = load_data(DataConfig(source=str(root / "train"), resize=100000, crop=8, workers=0))
    with pytest.raises(CompressError, match=r"--resize 100000 scales image .*\.png \(20x16\) to 125000x100000, which is 12,500,000,000 pixels, over the limit"):
        ds.x[0]


def test_resize_then_centre_crop(tmp_path):
    from PIL import Image

    a = np.zeros((40, 80, 3), np.uint8)  # 80 wide, 40 high: the shorter side (40) becomes 20, the width 40
    a[:, 24:56] = 255  # a white band around the middle: the centre 10x10 crop of the 20x40 image (columns 15-24) is inside it
    for c in ("a", "b"):
        for i in range(2):
            p = tmp_path / "train" / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(p)
    ds = load_data(DataConfig(source=str(tmp_path / "train"), eval_source=str(tmp_path / "train"), resize=20, crop=10))
    assert ds.x.shape[1:] == (3, 10, 10)
    assert ds.x[0].min() > 0.95  # only the white band is left
    wide = load_data(DataConfig(source=str(tmp_path / "train"), eval_source=str(tmp_path / "train"), resize=20, crop=20))
    assert wide.x[0].min() < 0.05  # a wider crop reaches the dark sides
    with pytest.raises(CompressError, match="--resize needs --crop"):
        load_data(DataConfig(source=str(tmp_path / "train"), eval_source=str(tmp_path / "train"), resize=20))
    with pytest.raises(CompressError, match="either --image-size or --crop"):
        load_data(DataConfig(source=str(tmp_path / "train"), eval_source=str(tmp_path / "train"), crop=10, image_size=[8, 8]))


def _teacher(root: Path) -> Path:
    """A small CNN teacher trained briefly on the labeled images, saved as TorchScript."""
    import torch

    ds = load_data(DataConfig(source=str(root / "train")))
    x, y = torch.from_numpy(np.asarray(ds.x)), torch.from_numpy(ds.y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d((4, 4)),
                              torch.nn.Flatten(), torch.nn.Linear(256, 3))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    path = root / "teacher.pt"
    torch.jit.trace(net.eval(), x[:2]).save(str(path))
    return path


def test_distill_streams_an_image_folder_the_same_with_or_without_workers(tmp_path, cli):
    """The same run with 0 and 2 decoding workers: the same batches in the same order, so the same student; with
    --unlabeled the pool and the report's data line count the unlabeled images."""
    root = _images(tmp_path / "d", 6, unlabeled=9)
    teacher = _teacher(root)
    results = []
    for workers in (0, 2):
        out = tmp_path / f"run{workers}"
        code, _, err = cli("distill", "--teacher", teacher, "--data", root / "train", "--unlabeled", root / "unlabeled",
                           "--workers", workers, "--steps", 12, "--batch-size", 8, "--no-baseline", "--skip-preflight", "--out", out)
        assert code == 0, err
        res = json.loads((out / "manifest.json").read_text())["stages"]["distill"]["result"]
        results.append(res)
        import torch

        results[-1]["weights"] = torch.load(out / "student.pt", weights_only=True)
    a, b = results
    assert a["data"]["train_unlabeled"] == 9 and a["data"]["train_labeled"] == 18 and a["data"]["heldout"] == 12
    assert a["student"]["history"] == b["student"]["history"]
    for k in a["weights"]:
        assert np.array_equal(a["weights"][k].numpy(), b["weights"][k].numpy()), k


class _RecordingTeacher:
    """Stands for a teacher: outputs a row's mean per channel, and records the batch sizes it is given."""

    def __init__(self, nan_row=None):
        self.sizes, self.nan_row, self.seen = [], nan_row, 0

    def logits(self, xb, batch_size):
        self.sizes.append(len(xb))
        out = np.asarray(xb).reshape(len(xb), xb.shape[1], -1).mean(axis=2).astype(np.float32)
        if self.nan_row is not None and self.seen <= self.nan_row < self.seen + len(xb):
            out[self.nan_row - self.seen, 0] = np.nan
        self.seen += len(xb)
        return out


def test_the_teacher_pass_writes_its_outputs_to_disk_a_batch_at_a_time(tmp_path):
    """Over rows on disk the pool's teacher outputs go straight into the .npy cache (memory-mapped), batch by batch at
    the batch size asked; NaN outputs are refused and leave no cache behind."""
    from compressor.data.streaming import ArrayRows
    from compressor.distill import teacher_pass

    root = _images(tmp_path / "d", 7, unlabeled=5)
    x = load_data(DataConfig(source=str(root / "train"), unlabeled=(str(root / "unlabeled"),), workers=0)).x
    t = _RecordingTeacher()
    cache = tmp_path / "cache" / "pool.npy"
    teacher_pass._shared_pass(t, x, 4, "cpu", cache)
    assert max(t.sizes) == 4 and sum(t.sizes) == len(x) == 26
    got = np.load(cache, mmap_mode="r")
    assert isinstance(got, np.memmap)
    np.testing.assert_allclose(got, np.asarray(x).mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    rows = ArrayRows(got).take(np.array([3, 1, 20]))
    np.testing.assert_array_equal(rows[np.array([0, 2])], got[[3, 20]])
    bad = tmp_path / "cache" / "bad.npy"
    with pytest.raises(CompressError, match="NaN or Inf for 1 of 26 training rows .first: row 9"):
        teacher_pass._shared_pass(_RecordingTeacher(nan_row=9), x, 4, "cpu", bad)
    assert sorted(p.name for p in bad.parent.iterdir()) == ["pool.npy"]


def one_and_two_ranks(tmp_path: Path, teacher: Path, data_args: list[str]):
    """`compress distill` over data_args with 1, then 2 torchrun gloo processes (20 steps at batch 8, no decoding
    workers); returns (the two students' state dicts, {n: [(rank, file) for every decode]} from COMPRESSOR_READ_LOG)."""
    import os
    import subprocess
    import sys

    import torch

    # a student without BatchNorm: on CPU, DDP keeps per-rank batch statistics (SyncBatchNorm is CUDA's), which would
    # differ from one process's whatever the data path
    (tmp_path / "students.py").write_text(
        "import torch.nn as nn\n"
        "def net(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(input_shape[0], 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),\n"
        "                         nn.Flatten(), nn.Linear(32, num_classes))\n")
    reads = {}
    for n in (1, 2):
        log = tmp_path / f"reads{n}.txt"
        argv = [sys.executable, "-m", "compressor.cli", "distill", "--teacher", str(teacher), *data_args, "--workers", "0",
                "--steps", "20", "--batch-size", "8", "--no-baseline", "--skip-preflight", "--teacher-output", "logits",
                "--device", "cpu", "--nproc-per-node", str(n), "--out", str(tmp_path / f"run{n}"), "--student", f"{tmp_path / 'students.py'}:net"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "COMPRESSOR_READ_LOG": str(log)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        reads[n] = [ln.split(" ", 1) for ln in log.read_text().splitlines()]
    a, b = (torch.load(tmp_path / f"run{n}" / "student.pt", weights_only=True) for n in (1, 2))
    for k in a:  # the same global batches and averaged gradients: equal up to floating-point order
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=2e-3, rtol=1e-3, err_msg=k)
    return a, b, reads


@pytest.mark.parametrize("augment", ["none", "image"])
def test_two_ranks_stream_their_shares_and_match_one_process(tmp_path, augment):
    """torchrun with 2 gloo processes over a streaming image folder: the same student as 1 process (within float
    tolerance), and each rank decodes only its share: the teacher's pass splits the pool, each step's batch is split.
    With function matching (--augment image, the teacher online) each row's view is made where it is decoded, seeded by
    its place in the global batch, so the ranks still read only their shares and see the views one process sees."""
    import os

    root = _images(tmp_path / "d", 12, unlabeled=12)
    teacher = _teacher(root)
    _, _, reads = one_and_two_ranks(tmp_path, teacher, ["--data", str(root / "train"), "--unlabeled", str(root / "unlabeled"),
                                                        "--augment", augment])
    if augment == "none":  # the teacher's pass, split across the ranks and gathered a batch at a time: the same cache
        cache = [np.load(tmp_path / f"run{n}" / "cache" / "teacher_pool_logits.npy") for n in (1, 2)]
        np.testing.assert_allclose(cache[0], cache[1], atol=1e-5, rtol=1e-5)
    else:  # online: no pool pass at all
        assert not (tmp_path / "run1" / "cache" / "teacher_pool_logits.npy").exists()
    # The unlabeled images are read only by the teacher's pass over the pool and by training batches (never for
    # validation, the held-out set or a probe; --teacher-output logits skips the detection sample): 2 ranks read each
    # of those exactly as often between them as 1 process does alone, and each rank about half of it.
    def pool_reads(n, rank):
        return sum(1 for r, f in reads[n] if r == rank and f"{os.sep}unlabeled{os.sep}" in f)
    one, r0, r1 = pool_reads(1, "0"), pool_reads(2, "0"), pool_reads(2, "1")
    assert one > 12 and r0 + r1 == one and max(r0, r1) <= 0.7 * one, (one, r0, r1)


def test_a_folder_of_npy_arrays_is_memory_mapped_and_trains_like_the_npz(tiny, tmp_path, cli):
    """x.npy/y.npy/x_test.npy/y_test.npy in a folder: read through a memory map, row by batch, and the student is the
    same as from the same arrays in an .npz."""
    with np.load(tiny.npz) as z:
        arrays = {k: z[k] for k in z.files}
    folder = tmp_path / "arrays"
    folder.mkdir()
    for k, v in arrays.items():
        np.save(folder / f"{k}.npy", v.astype(np.float32) if k.startswith("x") else v)
    ds = load_data(DataConfig(source=str(folder)))
    assert type(ds.x).__name__ == "ArrayRows" and isinstance(ds.x.array, np.memmap)
    np.testing.assert_array_equal(ds.x[[3, 1]], arrays["x"][[3, 1]].astype(np.float32))
    runs = {}
    for name, data in (("npz", tiny.npz), ("npy", folder)):
        out = tmp_path / name
        code, _, err = cli("distill", "--teacher", tiny.torchscript, "--data", data, "--steps", 15, "--no-baseline", "--out", out)
        assert code == 0, err
        import torch

        runs[name] = torch.load(out / "student.pt", weights_only=True)
    for k in runs["npz"]:
        assert np.array_equal(runs["npz"][k].numpy(), runs["npy"][k].numpy()), k
    (folder / "x.npy").unlink()
    np.save(folder / "x.npy", arrays["x"].astype(np.float64))
    with pytest.raises(CompressError, match="must be float32"):
        load_data(DataConfig(source=str(folder)))


def test_the_bench_preprocessing_row_skips_a_folder_of_npy_arrays(tmp_path):
    """A folder of .npy arrays is a directory but no image folder: the bench has no per-frame preprocessing to time for
    it (it raised 'has no class sub-folders' and failed the bench stage)."""
    from types import SimpleNamespace

    from compressor.bench.runner_bench import preprocessing_time
    from compressor.config import BenchConfig

    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "x.npy", np.zeros((8, 3, 4, 4), np.float32))
    np.save(folder / "y.npy", np.zeros(8, np.int64))
    run = SimpleNamespace(config=SimpleNamespace(data=DataConfig(source=str(folder))), data=SimpleNamespace(input_shape=(3, 4, 4)))
    assert preprocessing_time(run, BenchConfig()) is None
