"""WebDataset tar shards as --data: indexed from their headers, decoded on demand like an image folder, written by
webdataset's own ShardWriter here (the format users bring); split across torchrun ranks by rows, each rank reading
only its own; and the promised one-line errors for a bad pattern or shard."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from compressor.config import DataConfig
from compressor.data import load_data
from compressor.errors import CompressError

from test_streaming import _images, _teacher, one_and_two_ranks

wds = pytest.importorskip("webdataset", reason="tests write shards with webdataset's ShardWriter (pip install webdataset)")


def _shards(root: Path, out: Path, per_shard: int = 7) -> str:
    """The images of an image folder (train/<class>/ labeled, unlabeled/ without a .cls) as shards of per_shard samples,
    written by webdataset.ShardWriter in a shuffled order; returns the brace pattern naming them."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    items = [(f, c) for c, name in enumerate(classes) for f in sorted((root / "train" / name).iterdir())]
    items += [(f, -1) for f in sorted((root / "unlabeled").rglob("*.jpg"))]
    order = np.random.default_rng(0).permutation(len(items))
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for n in order:
            f, c = items[n]
            sample = {"__key__": f"s{n:05d}", f.suffix[1:]: f.read_bytes()}
            if c >= 0:
                sample["cls"] = c
            sink.write(sample)
    count = len(list(out.glob("train-*.tar")))
    return str(out / f"train-{{000000..{count - 1:06d}}}.tar"), items, order


def test_shards_read_like_the_image_folder_they_were_made_from(tmp_path):
    """Sample k of the shards is the k-th image the writer got: the same pixels as the image folder's decode of that
    file, its class from .cls, -1 without one; the pool keeps every unlabeled sample and holds out labeled ones only."""
    from compressor.data.image_folder import read_images
    from compressor.data.shards import _rows

    root = _images(tmp_path / "d", 5, unlabeled=6)
    spec, items, order = _shards(root, tmp_path / "shards")
    cfg = DataConfig(source=spec, image_size=(16, 20), workers=0)
    x, y, _ = _rows(spec, cfg, None)
    ref, _ = read_images([(items[n][0], 0) for n in order], (16, 20), 3, cfg)
    np.testing.assert_array_equal(np.asarray(x), ref)
    np.testing.assert_array_equal(y, [items[n][1] for n in order])
    from compressor.data.shards import first_sample_decoder

    dec, name = first_sample_decoder(spec, (16, 20), 3, cfg)  # what the bench times as the preprocessing of one frame
    np.testing.assert_array_equal(dec(0), np.asarray(x[0]))
    assert name.endswith("train-000000.tar:s%05d" % order[0])
    ds = load_data(DataConfig(source=spec, image_size=(16, 20), heldout_fraction=0.2, workers=0))
    assert len(ds.y) + len(ds.y_test) == len(items) == 21
    assert (ds.y == -1).sum() == 6 and (ds.y_test >= 0).all() and len(ds.y_test) == 3
    assert ds.summary()["train_unlabeled"] == 6


@pytest.mark.parametrize("case, message", [
    ("missing", "7 of the 10 shards --data .* names do not exist .first: .*train-000003.tar"),
    ("gzip", "is not an uncompressed tar file"),
    ("no-image", "sample a1 has no image"),
    ("bad-label", "holds b'cat', not an integer class"),
    ("unlabeled-flag", "--unlabeled takes image folders, but --data is a list of shards"),
    ("huge-label", "holds class 99999999999999999999; classes are 0, 1"),
    ("truncated", "ends in the middle of a file: it is cut short"),
    ("empty", "the shards hold no samples"),
    ("eval-overlap", "--eval-data and --data name the same shard"),
    ("corrupt", "cannot read image .*:s00"),
])
def test_bad_shards_get_one_clear_error(tmp_path, case, message):
    root = _images(tmp_path / "d", 3, unlabeled=2)
    spec, _, _ = _shards(root, tmp_path / "shards", per_shard=4)
    cfg = {}
    if case == "missing":
        spec = str(tmp_path / "shards" / "train-{000000..000009}.tar")
    elif case in ("gzip", "no-image", "bad-label", "huge-label", "truncated", "empty"):
        spec = str(tmp_path / "bad.tar")
        png = (root / "train" / "c0" / "0.png").read_bytes()
        members = {"gzip": [], "truncated": [], "no-image": [("a1.json", b"{}")], "bad-label": [("a1.png", png), ("a1.cls", b"cat")],
                   "huge-label": [("a1.png", png), ("a1.cls", b"99999999999999999999")], "empty": [("dir/", None)]}[case]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data in members or [("a1.png", png), ("b2.png", png)]:
                info = tarfile.TarInfo(name)
                if data is None:
                    info.type = tarfile.DIRTYPE
                    tf.addfile(info)
                    continue
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        Path(spec).write_bytes(gzip.compress(raw) if case == "gzip" else raw[:512 + len(png) // 2] if case == "truncated" else raw)
    elif case == "eval-overlap":
        cfg["eval_source"] = str(tmp_path / "shards" / "train-000001.tar")
    elif case == "unlabeled-flag":
        cfg["unlabeled"] = (str(root / "unlabeled"),)
    elif case == "corrupt":  # a sample's bytes overwritten with junk (same size): found by the check before training
        first = tmp_path / "shards" / "train-000000.tar"
        with tarfile.open(first) as tf:
            m = next(m for m in tf if m.name.endswith((".png", ".jpg")))
        with open(first, "r+b") as fh:
            fh.seek(m.offset_data)
            fh.write(b"\0" * m.size)
    with pytest.raises(CompressError, match=message):
        load_data(DataConfig(source=spec, image_size=(16, 20), workers=0, **cfg))


def test_a_shard_pattern_naming_missing_files_is_refused_before_out_is_made(tmp_path, cli):
    code, _, err = cli("distill", "--teacher", tmp_path / "t.pt", "--data", str(tmp_path / "x-{0..3}.tar"), "--out", tmp_path / "run")
    assert code == 2 and not (tmp_path / "run").exists(), err
    assert len(err.strip().splitlines()) <= 2


def test_two_ranks_over_shards_read_their_shares_and_match_one_process(tmp_path):
    """torchrun with 2 gloo processes over shards: the same student as 1 process, the same teacher outputs, and each rank
    decodes about half of the pool's samples (COMPRESSOR_READ_LOG counts every decode by rank)."""
    root = _images(tmp_path / "d", 12, unlabeled=12)
    teacher = _teacher(root)
    spec, _, _ = _shards(root, tmp_path / "shards", per_shard=10)
    _, _, reads = one_and_two_ranks(tmp_path, teacher, ["--data", spec, "--image-size", "16x20"])  # the same student from both
    cache = [np.load(tmp_path / f"run{n}" / "cache" / "teacher_pool_logits.npy") for n in (1, 2)]
    np.testing.assert_allclose(cache[0], cache[1], atol=1e-5, rtol=1e-5)
    one, r0, r1 = len(reads[1]), sum(r == "0" for r, _ in reads[2]), sum(r == "1" for r, _ in reads[2])
    # the pool's pass, the training batches and the validation rows are split between the ranks (the held-out rows are
    # read once, by rank 0): together they read what one process reads, plus the few rows each rank's startup probes
    # (the teacher and the student are probed on the first 2 rows, a few times)
    assert one > 40 and one <= r0 + r1 <= one + 8 and max(r0, r1) <= 0.7 * one, (one, r0, r1)
    m = json.loads((tmp_path / "run2" / "manifest.json").read_text())
    assert m["inputs"]["data"]["source"] == spec  # absolute: later stages read the same shards
