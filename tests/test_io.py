"""Atomic writes: a failure inside the block leaves neither the final file nor a temporary one."""
from __future__ import annotations

import json
import math

import pytest

from compressor._io import atomic_path, ensure_dir, sha256_file, write_bytes, write_json, write_text
from compressor.errors import CompressError


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def test_exception_inside_block_leaves_nothing(tmp_path):
    final = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final) as tmp:
            assert tmp.parent == final.parent and tmp != final
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert not final.exists()
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_inside_block_leaves_nothing(tmp_path):
    final = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not final.exists() and _leftovers(tmp_path) == []


def test_failure_keeps_the_previous_file(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(final) as tmp:
            tmp.write_text("new but broken")
            raise ValueError
    assert final.read_text() == "old" and _leftovers(tmp_path) == []


def test_success_writes_the_whole_content(tmp_path):
    final = tmp_path / "sub" / "dir" / "out.bin"  # parents are created
    data = bytes(range(256)) * 4000
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
        assert not final.exists(), "the final name appears only after the block"
    assert final.read_bytes() == data
    assert _leftovers(final.parent) == []
    write_bytes(final, b"again")
    assert final.read_bytes() == b"again"
    write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"


def test_final_file_gets_normal_permissions(tmp_path):
    import os

    final = tmp_path / "perm.txt"
    write_text(final, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_json_round_trips(tmp_path):
    obj = {"a": [1, 2.5, None], "b": {"c": "d"}}
    write_json(tmp_path / "x.json", obj)
    assert json.loads((tmp_path / "x.json").read_text()) == obj


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_write_json_refuses_non_finite_without_partial_file(tmp_path, bad):
    final = tmp_path / "x.json"
    with pytest.raises(ValueError):
        write_json(final, {"ok": 1, "bad": [bad]})
    assert not final.exists() and _leftovers(tmp_path) == []
    write_json(final, {"ok": 1})
    with pytest.raises(ValueError):
        write_json(final, {"bad": bad})
    assert json.loads(final.read_text()) == {"ok": 1}, "a refused write must not damage the previous file"


def test_ensure_dir_on_a_file_is_a_compress_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CompressError, match="not a directory"):
        ensure_dir(f)
    with pytest.raises(CompressError):
        write_text(f / "child.txt", "x")


def test_sha256_file(tmp_path):
    import hashlib

    f = tmp_path / "a"
    f.write_bytes(b"abc" * 1000)
    assert sha256_file(f, chunk=7) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_a_stage_start_removes_temporaries_left_by_a_killed_process(tmp_path):
    from compressor.config import CompressConfig
    from compressor.run import Run

    run = Run.create(tmp_path / "run", CompressConfig())
    (run.dir / "checkpoints").mkdir()
    stale = run.dir / "checkpoints" / ".student.ckpt.abc123.tmp"
    stale.write_bytes(b"half")
    kept = run.dir / "checkpoints" / "student.ckpt"
    kept.write_bytes(b"whole")
    run.begin("distill")
    assert not stale.exists() and kept.read_bytes() == b"whole"
