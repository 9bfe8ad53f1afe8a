"""Data sources: .npz (with or without a held-out set) and image folders; splits are stratified and
seeded; every malformed input is a CompressError naming the problem."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.config import DataConfig
from compressor.data import check_classes, load_data, stratified_split
from compressor.errors import CompressError
from conftest import fuzz_count


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _xy(n=120, length=16, classes=3, unlabeled=20, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, length)).astype(np.float32)
    y = np.arange(n, dtype=np.int64) % classes
    y[:unlabeled] = -1
    return x, y


# --- .npz ---------------------------------------------------------------------------------------
def test_npz_with_test_arrays_uses_them(tiny):
    ds = load_data(DataConfig(source=str(tiny.npz)))
    assert ds.heldout_source == "x_test"
    np.testing.assert_array_equal(ds.x, tiny.x)
    np.testing.assert_array_equal(ds.y, tiny.y)
    np.testing.assert_array_equal(ds.x_test, tiny.x_test)
    np.testing.assert_array_equal(ds.y_test, tiny.y_test)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    s = ds.summary()
    assert s["train_unlabeled"] == int((tiny.y < 0).sum()) and s["train_labeled"] == int((tiny.y >= 0).sum())
    assert s["heldout"] == len(tiny.y_test) and ds.num_classes == 3 and ds.input_shape == (tiny.x.shape[1],)


def test_npz_without_test_arrays_is_split_stratified_and_seeded(tmp_path):
    x, y = _xy(n=150, unlabeled=30)
    p = _npz(tmp_path / "d.npz", x=x, y=y)
    a = load_data(DataConfig(source=str(p), heldout_fraction=0.2, seed=3))
    b = load_data(DataConfig(source=str(p), heldout_fraction=0.2, seed=3))
    c = load_data(DataConfig(source=str(p), heldout_fraction=0.2, seed=4))
    assert a.heldout_source == "split"
    np.testing.assert_array_equal(a.y_test, b.y_test)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test), "a different seed should give a different split"
    # every class is on both sides, in roughly the asked fraction
    labeled = y[y >= 0]
    for cls in range(3):
        assert (a.y == cls).sum() > 0 and (a.y_test == cls).sum() > 0
        assert abs((a.y_test == cls).sum() - 0.2 * (labeled == cls).sum()) <= 1
    # unlabeled rows stay in the pool and never reach the held-out set
    assert (a.y == -1).sum() == 30
    assert (a.y_test >= 0).all()
    assert len(a.y) + len(a.y_test) == len(y)
    # no row is in both
    pool = {r.tobytes() for r in a.x}
    assert not any(r.tobytes() in pool for r in a.x_test)


def test_stratified_split_never_empties_a_class():
    y = np.array([0, 0, 1, 1, 1, 2, -1, -1], np.int64)
    keep, held = stratified_split(y, 0.5, 0)
    assert set(y[held]) == {0, 1}  # class 2 has a single row: it stays in training
    assert set(y[keep]) == {0, 1, 2}
    assert not set(keep) & set(held) and -1 not in set(y[held]) and -1 not in set(y[keep])


def test_npz_split_with_too_few_labeled_rows(tmp_path):
    x = np.zeros((5, 4), np.float32)
    y = np.array([0, 1, 2, -1, -1], np.int64)
    with pytest.raises(CompressError, match="too few labeled rows"):
        load_data(DataConfig(source=str(_npz(tmp_path / "d.npz", x=x, y=y))))


BAD_NPZ = {
    "missing_y": (lambda x, y: {"x": x}, "'x' and 'y'"),
    "int_x": (lambda x, y: {"x": (x * 10).astype(np.int32), "y": y}, "integer dtype"),
    "bool_x": (lambda x, y: {"x": x > 0, "y": y}, "float"),
    "float_y": (lambda x, y: {"x": x, "y": y.astype(np.float32)}, "integer array"),
    "labels_below_minus_one": (lambda x, y: {"x": x, "y": np.where(y == 0, -2, y)}, "below -1"),
    "nan_x": (lambda x, y: {"x": np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), "y": y}, "NaN or Inf"),
    "inf_x": (lambda x, y: {"x": np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x), "y": y}, "NaN or Inf"),
    "inf_x_test": (lambda x, y: {"x": x, "y": y, "x_test": np.full_like(x[:5], np.inf), "y_test": np.zeros(5, np.int64)}, "x_test"),
    "no_labeled_rows": (lambda x, y: {"x": x, "y": np.full_like(y, -1), "x_test": x[:5], "y_test": np.zeros(5, np.int64)}, "no labeled rows"),
    "y_length_mismatch": (lambda x, y: {"x": x, "y": y[:-3]}, "shape"),
    "y_length_mismatch_with_test": (lambda x, y: {"x": x, "y": y[:-3], "x_test": x[:5], "y_test": np.zeros(5, np.int64)}, "shape"),
    "y_2d": (lambda x, y: {"x": x, "y": y[:, None]}, "shape"),
    "x_1d": (lambda x, y: {"x": x[:, 0].copy(), "y": y, "x_test": x[:5, 0].copy(), "y_test": np.zeros(5, np.int64)}, "at least 2 dimensions"),
    "only_x_test": (lambda x, y: {"x": x, "y": y, "x_test": x[:5]}, "both"),
    "unlabeled_test_rows": (lambda x, y: {"x": x, "y": y, "x_test": x[:5], "y_test": np.full(5, -1, np.int64)}, "y_test"),
    "test_shape_differs": (lambda x, y: {"x": x, "y": y, "x_test": x[:5, :8], "y_test": np.zeros(5, np.int64)}, "shape"),
    "empty_test": (lambda x, y: {"x": x, "y": y, "x_test": x[:0], "y_test": np.zeros(0, np.int64)}, "empty"),
    "object_array": (lambda x, y: {"x": np.array([object()] * len(y)), "y": y}, None),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_malformed_npz_is_a_compress_error(tmp_path, case):
    make, msg = BAD_NPZ[case]
    x, y = _xy()
    arrays = make(x, y)
    p = tmp_path / "bad.npz"
    if case == "object_array":
        np.savez(p, **arrays)  # pickled object array: must be refused, never unpickled
    else:
        _npz(p, **arrays)
    with pytest.raises(CompressError, match=msg) as ei:
        load_data(DataConfig(source=str(p)))
    assert ei.value.exit_code == 2


def test_missing_data_file(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        load_data(DataConfig(source=str(tmp_path / "nope.npz")))


def test_empty_random_and_truncated_npz(tiny, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    rnd = tmp_path / "random.npz"
    rnd.write_bytes(np.random.default_rng(0).bytes(2000))
    blob = tiny.npz.read_bytes()
    for name, frac in (("cut_half.npz", 0.5), ("cut_end.npz", 0.98), ("cut_start.npz", 0.05)):
        (tmp_path / name).write_bytes(blob[: int(len(blob) * frac)])
    for p in [empty, rnd, *(tmp_path / n for n in ("cut_half.npz", "cut_end.npz", "cut_start.npz"))]:
        with pytest.raises(CompressError):
            load_data(DataConfig(source=str(p)))


def test_single_npy_array_is_refused(tmp_path):
    p = tmp_path / "arr.npz"
    with open(p, "wb") as fh:
        np.save(fh, np.zeros((4, 4), np.float32))
    with pytest.raises(CompressError, match="single .npy"):
        load_data(DataConfig(source=str(p)))


def test_torchscript_given_as_data_is_refused(tiny):
    with pytest.raises(CompressError):
        load_data(DataConfig(source=str(tiny.torchscript)))


def test_corrupted_member_of_npz_is_a_compress_error(tiny, tmp_path):
    """A zip whose member bytes were damaged (CRC mismatch) is reported, not raised as zipfile/numpy errors."""
    blob = bytearray(tiny.npz.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(blob))) as z:
        info = z.getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200  # inside x's data
    for i in range(start, start + 64):
        blob[i] ^= 0xFF
    p = tmp_path / "flipped.npz"
    p.write_bytes(bytes(blob))
    with pytest.raises(CompressError):
        load_data(DataConfig(source=str(p)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=4096))
def test_arbitrary_bytes_as_npz_raise_only_compress_error(tmp_path, blob):
    fuzz_count("hypothesis:npz-bytes")
    p = tmp_path / "fuzz.npz"
    p.write_bytes(blob)
    try:
        load_data(DataConfig(source=str(p)))
    except CompressError:
        pass


@pytest.fixture(scope="module")
def npz_blob(tmp_path_factory) -> bytes:
    x, y = _xy(n=30, length=8, unlabeled=5)
    p = tmp_path_factory.mktemp("blob") / "d.npz"
    np.savez(p, x=x, y=y, x_test=x[:6], y_test=np.abs(y[:6]))
    return p.read_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_valid_npz_raises_only_compress_error(tmp_path, npz_blob, data):
    """Random truncations and byte flips of a real .npz: either it still loads, or a CompressError."""
    fuzz_count("hypothesis:npz-bytes")
    blob = bytearray(npz_blob)
    cut = data.draw(st.integers(0, len(blob)), label="cut")
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)), max_size=8), label="flips")
    for i, v in flips:
        blob[i] ^= v
    p = tmp_path / "mut.npz"
    p.write_bytes(bytes(blob[:cut]))
    try:
        ds = load_data(DataConfig(source=str(p)))
    except CompressError:
        return
    assert np.isfinite(ds.x).all() and (ds.y >= -1).all() and (ds.y_test >= 0).all()


# --- check_classes ----------------------------------------------------------------------------
def test_check_classes(tiny):
    ds = load_data(DataConfig(source=str(tiny.npz)))
    check_classes(ds, 3)
    check_classes(ds, 5)  # a teacher with more classes than the data uses is fine
    with pytest.raises(CompressError, match="labels go up to 2"):
        check_classes(ds, 2)


# --- image folders --------------------------------------------------------------------------------
def _png(path: Path, value: int, size=(8, 8), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]) if mode == "L" else (size[1], size[0], 3), value, np.uint8)
    Image.fromarray(arr, mode).save(path)


def _folder(root: Path, classes=("cat", "dog"), n=4, size=(8, 8), mode="L"):
    for ci, c in enumerate(classes):
        for i in range(n):
            _png(root / c / f"{i}.png", 40 + (160 // max(1, len(classes) - 1)) * ci + i, size, mode)
    return root


def test_image_folder_with_sibling_test_folder(tmp_path):
    train = _folder(tmp_path / "imgs" / "train", n=5)
    _folder(tmp_path / "imgs" / "test", n=2)
    ds = load_data(DataConfig(source=str(train)))
    assert ds.heldout_source == "folder"
    assert ds.class_names == ["cat", "dog"]
    assert ds.x.shape == (10, 1, 8, 8) and ds.x_test.shape == (4, 1, 8, 8)
    assert ds.x.dtype == np.float32 and 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert sorted(ds.y_test.tolist()) == [0, 0, 1, 1]
    # the pixel value encodes the class: dark = cat (0), bright = dog (1)
    assert (ds.x[ds.y == 0].mean() < 0.3) and (ds.x[ds.y == 1].mean() > 0.7)


def test_image_folder_test_folder_with_fewer_classes_keeps_indices(tmp_path):
    train = _folder(tmp_path / "train", classes=("a", "b", "c"), n=3)
    _folder(tmp_path / "test", classes=("c",), n=2)
    ds = load_data(DataConfig(source=str(train)))
    assert ds.y_test.tolist() == [2, 2]


def test_image_folder_test_folder_with_unknown_class(tmp_path):
    train = _folder(tmp_path / "train", classes=("a", "b"), n=3)
    _folder(tmp_path / "test", classes=("a", "zebra"), n=2)
    with pytest.raises(CompressError, match="zebra"):
        load_data(DataConfig(source=str(train)))


def test_image_folder_without_test_is_split(tmp_path):
    root = _folder(tmp_path / "pics", n=5)
    ds = load_data(DataConfig(source=str(root)))
    assert ds.heldout_source == "split"
    assert set(ds.y_test.tolist()) == {0, 1} and set(ds.y.tolist()) == {0, 1}


def test_image_size_and_channels(tmp_path):
    root = _folder(tmp_path / "rgb" / "train", n=3, size=(10, 6), mode="RGB")
    _folder(tmp_path / "rgb" / "test", n=1, size=(10, 6), mode="RGB")
    own = load_data(DataConfig(source=str(root)))
    assert own.x.shape[1:] == (3, 6, 10)  # C, H, W from the first image
    ds = load_data(DataConfig(source=str(root), image_size=[4, 5], channels=1))
    assert ds.x.shape == (6, 1, 4, 5) and ds.x_test.shape == (2, 1, 4, 5)
    # the teacher's declared input shape decides when no flag is given
    t = load_data(DataConfig(source=str(root)), teacher_input_shape=(None, 1, 7, 9))
    assert t.x.shape[1:] == (1, 7, 9)


def test_image_mean_std(tmp_path):
    root = _folder(tmp_path / "train", n=2)
    _folder(tmp_path / "test", n=1)
    plain = load_data(DataConfig(source=str(root)))
    norm = load_data(DataConfig(source=str(root), mean=[0.5], std=[0.25]))
    np.testing.assert_allclose(np.asarray(norm.x), (np.asarray(plain.x) - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(CompressError, match="std"):
        load_data(DataConfig(source=str(root), mean=[0.5], std=[0.0]))


def test_empty_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompressError, match="no class sub-folders"):
        load_data(DataConfig(source=str(tmp_path / "empty")))
    (tmp_path / "noimgs" / "a").mkdir(parents=True)
    (tmp_path / "noimgs" / "a" / "readme.txt").write_text("hi")
    with pytest.raises(CompressError, match="no images"):
        load_data(DataConfig(source=str(tmp_path / "noimgs")))


def test_unreadable_image_is_a_compress_error(tmp_path):
    root = _folder(tmp_path / "train", n=3)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG garbage" + bytes(range(256)))
    _folder(tmp_path / "test", n=1)
    with pytest.raises(CompressError, match="broken.png"):
        load_data(DataConfig(source=str(root)))


def test_unreadable_first_image_is_a_compress_error(tmp_path):
    root = tmp_path / "pics"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.png").write_bytes(b"not an image at all")
    _png(root / "a" / "1.png", 10)
    with pytest.raises(CompressError, match="0.png"):
        load_data(DataConfig(source=str(root)))


def test_explicit_eval_folder(tmp_path):
    root = _folder(tmp_path / "data", n=3)
    ev = _folder(tmp_path / "elsewhere", n=2)
    ds = load_data(DataConfig(source=str(root), eval_source=str(ev)))
    assert ds.heldout_source == "folder" and len(ds.y_test) == 4
    with pytest.raises(CompressError, match="not a folder"):
        load_data(DataConfig(source=str(root), eval_source=str(tmp_path / "missing")))


def test_npz_without_heldout_and_without_labels_is_a_clear_error(tmp_path):
    """Found by the fuzzer: the stratified split used to crash on a pool with no labeled rows."""
    p = tmp_path / "unlabeled.npz"
    np.savez(p, x=np.zeros((10, 4), np.float32), y=np.full(10, -1, np.int64))
    with pytest.raises(CompressError, match="labeled rows"):
        load_data(DataConfig(source=str(p)))


# --- image modes and bit depths (issue 17) ----------------------------------------------------------------------------
def _png_bytes(w: int, h: int, depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: the header may claim any size whatever the (compressed) pixel data holds."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16_bit_grayscale_pngs_load_at_full_range(tmp_path):
    """PIL's I;16 -> L conversion saturated every value above 255: a 16-bit folder loaded as all 1.0."""
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for c in ("a", "b"):
        for i in range(3):
            arr = rng.integers(0, 65536, (6, 5)).astype(np.uint16)
            (tmp_path / "imgs" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
            written[(c, i)] = arr
    assert Image.open(tmp_path / "imgs" / "a" / "0.png").mode == "I;16"
    ds = load_data(DataConfig(source=str(tmp_path / "imgs"), heldout_fraction=0.34))
    x = np.concatenate([ds.x, ds.x_test])[:, 0]
    assert x.shape[1:] == (6, 5) and 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.2  # spread, not all 1.0
    expected = [a.astype(np.float32) / 65535 for a in written.values()]
    for img in x:  # every loaded image is one of the written arrays at full range
        assert min(np.abs(img - e).max() for e in expected) < 1e-6


def test_every_pil_mode_maps_to_the_same_scale(tmp_path):
    """8-bit, 16-bit (both byte orders, and PIL's 32-bit I), float, palette, CMYK, alpha and 1-bit images in one folder:
    one [0, 1] scale, nothing clipped."""
    from PIL import Image

    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    g8 = np.array([[0, 64, 128], [192, 255, 10]], np.uint8)
    expect = g8.astype(np.float32) / 255
    Image.fromarray(g8).save(root / "a" / "0_l8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(root / "a" / "1_i16.png")  # 16-bit: v * 257 is v / 255 of 65535
    big = np.zeros((2, 3, 1), ">u2")
    big[..., 0] = g8.astype(np.uint16) * 257
    (root / "a" / "2_i16b.png").write_bytes(_png_bytes(3, 2, 16, 0, b"".join(b"\x00" + r.tobytes() for r in big)))
    Image.fromarray(g8.astype(np.int32) * 257, "I").save(root / "a" / "3_i32.tif")
    Image.fromarray(expect).save(root / "a" / "4_f.tif")  # mode F, already in [0, 1]
    la = Image.merge("LA", [Image.fromarray(g8), Image.fromarray(np.full_like(g8, 7))])  # alpha is dropped, the grey kept
    la.save(root / "a" / "5_la.png")
    Image.fromarray(g8 >= 128).save(root / "a" / "6_1bit.png")
    ds = load_data(DataConfig(source=str(root), channels=1, eval_source=str(root)))
    by_name = dict(zip(sorted(p.name for p in (root / "a").iterdir()), ds.x_test[ds.y_test == 0][:, 0]))
    assert set(by_name) == {"0_l8.png", "1_i16.png", "2_i16b.png", "3_i32.tif", "4_f.tif", "5_la.png", "6_1bit.png"}
    for name in ("0_l8.png", "1_i16.png", "2_i16b.png", "3_i32.tif", "4_f.tif", "5_la.png"):
        np.testing.assert_allclose(by_name[name], expect, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(by_name["6_1bit.png"], (g8 >= 128).astype(np.float32))


def test_palette_cmyk_and_alpha_colour_images(tmp_path):
    from PIL import Image

    root = tmp_path / "colour"
    (root / "a").mkdir(parents=True)
    rgb = np.array([[[255, 0, 0], [0, 128, 255]], [[10, 20, 30], [255, 255, 255]]], np.uint8)
    Image.fromarray(rgb).save(root / "a" / "0_rgb.png")
    Image.fromarray(rgb).quantize(4).save(root / "a" / "1_palette.png")
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 3, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(root / "a" / "2_rgba.png")
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(root / "a" / "3_cmyk.jpg", quality=100, subsampling=0)
    pal = Image.fromarray(rgb).quantize(4)
    pal.info["transparency"] = 0
    pal.save(root / "a" / "4_palette_transparent.png", transparency=0)
    ds = load_data(DataConfig(source=str(root), eval_source=str(root)))
    assert ds.x.shape[1:] == (3, 2, 2)
    got = dict(zip(sorted(p.name for p in (root / "a").iterdir()), np.asarray(ds.x_test).transpose(0, 2, 3, 1)))
    want = rgb.astype(np.float32) / 255
    for name in ("0_rgb.png", "1_palette.png", "2_rgba.png", "4_palette_transparent.png"):
        np.testing.assert_allclose(got[name], want, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(got["3_cmyk.jpg"], want, atol=0.05)  # JPEG: close, not exact


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    root = tmp_path / "phone"
    (root / "a").mkdir(parents=True)
    arr = np.array([[0, 50, 100], [150, 200, 250]], np.uint8)  # 2 rows x 3 columns as stored
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(root / "a" / "0.jpg", exif=exif, quality=100, subsampling=0)
    ds = load_data(DataConfig(source=str(root), eval_source=str(root)))
    shown = np.asarray(Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270), np.float32) / 255
    assert ds.x.shape[2:] == (3, 2)  # displayed upright: 3 rows x 2 columns
    np.testing.assert_allclose(ds.x[0, 0], shown, atol=0.03)


def test_images_whose_scale_is_unknown_are_errors_not_clipped(tmp_path):
    from PIL import Image

    root = tmp_path / "odd"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.array([[0.0, 2.5]], np.float32)).save(root / "a" / "0.tif")
    # found when the image is decoded (images stream from disk: the teacher's pass over the pool, before any training)
    with pytest.raises(CompressError, match=r"0\.tif holds floats \(mode F\) from 0 to 2\.5"):
        np.asarray(load_data(DataConfig(source=str(root), eval_source=str(root))).x)
    (root / "a" / "0.tif").unlink()
    Image.fromarray(np.array([[0, 70000]], np.int32), "I").save(root / "a" / "1.tif")
    with pytest.raises(CompressError, match=r"1\.tif holds integers .* outside 0\.\.65535"):
        np.asarray(load_data(DataConfig(source=str(root), eval_source=str(root))).x)


def _bomb_folder(root: Path, first: bool) -> Path:
    """A folder whose PNG header claims 30000 x 30000 pixels (900 M; a tiny file: PIL reads the header lazily)."""
    _png(root / "a" / "1.png", 10)
    _png(root / "b" / "1.png", 200)
    (root / "a" / ("0.png" if first else "2.png")).write_bytes(_png_bytes(30000, 30000, 8, 0, b"\x00" * 30001))
    return root


def test_decompression_bomb_is_a_compress_error_naming_the_file(tmp_path, cli, tiny):
    with pytest.raises(CompressError, match=r"2\.png \(30000x30000\) is 900,000,000 pixels, over the limit of 89,478,485"):
        load_data(DataConfig(source=str(_bomb_folder(tmp_path / "later", first=False)), eval_source=str(tmp_path / "later")))
    root = _bomb_folder(tmp_path / "first", first=True)
    code, _, err = cli("distill", "--teacher", tiny.torchscript, "--data", root, "--eval-data", root, "--out", tmp_path / "run")
    assert code == 2 and "0.png" in err and "--max-image-pixels" in err and err.count("\n") == 1, err


def test_max_image_pixels_and_image_size_limits(tmp_path, cli, tiny):
    root = _folder(tmp_path / "pics", n=2)
    with pytest.raises(CompressError, match=r"0\.png \(8x8\) is 64 pixels, over the limit of 50"):
        load_data(DataConfig(source=str(root), max_image_pixels=50))
    assert load_data(DataConfig(source=str(root), max_image_pixels=64)).x.shape[2:] == (8, 8)
    with pytest.raises(CompressError, match=r"image size 10000x10000 .* 100,000,000 pixels, over the limit of 89,478,485"):
        load_data(DataConfig(source=str(root), image_size=[10000, 10000]))
    code, _, err = cli("distill", "--teacher", tiny.torchscript, "--data", root, "--image-size", "10000x10000", "--out", tmp_path / "run1")
    assert code == 2 and "over the limit of 89,478,485 (--max-image-pixels)" in err and err.count("\n") == 1, err
    code, _, err = cli("distill", "--teacher", tiny.torchscript, "--data", root, "--image-size", "100000x100000", "--out", tmp_path / "run2")
    assert code == 2 and "--image-size" in err, err  # refused when parsed (each side at most 16384), or by the pixel limit
    code, _, err = cli("distill", "--teacher", tiny.torchscript, "--data", root, "--max-image-pixels", "50", "--out", tmp_path / "run50")
    assert code == 2 and "over the limit of 50 (--max-image-pixels)" in err, err


@pytest.mark.parametrize("flags", [{"mean": [0.5], "std": [0.2]}, {"image_size": [8, 8]}, {"channels": 1}])
def test_image_only_options_on_array_data_are_refused_not_ignored(tiny, flags):
    """--mean/--std/--image-size/--channels used to be dropped silently for an .npz: a run on unnormalised data."""
    with pytest.raises(CompressError, match="apply to image folders only"):
        load_data(DataConfig(source=str(tiny.npz), **flags))
