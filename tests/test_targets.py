"""Target profiles: the shipped ones validate, names and aliases resolve, typos get a suggestion, and a
user's own .toml is validated with a clear error."""
from __future__ import annotations


import pytest

from compressor.errors import CompressError
from compressor.targets import _profiles_dir, get_target, list_targets, load_profile

USER_PROFILE = '''schema_version = 1
name = "my-board"
description = "A board of my own"
kind = "cpu"
is_host = true

[runtime]
name = "onnxruntime"
onnx_opset = 17
source = "me"

[quantization]
int8_recipe = "cpu-s8s8"
precisions = ["fp32", "int8"]
'''


def test_every_builtin_profile_validates():
    files = sorted(_profiles_dir().glob("*.toml"))
    assert len(files) >= 4
    for f in files:
        p = load_profile(f)
        assert p["name"] == f.stem, "a profile's file name should be its name"
    names = [p["name"] for p in list_targets()]
    assert names == sorted(names) and {"cpu", "jetson-orin-nano-8gb"} <= set(names)


def test_names_and_aliases_are_unique():
    seen = []
    for p in list_targets():
        seen += [p["name"], *p.get("aliases", [])]
    assert len(seen) == len(set(seen)), seen


def test_builtin_recipes_exist():
    from compressor.export.quantize import list_recipes

    for p in list_targets():
        assert p["quantization"]["int8_recipe"] in list_recipes(), p["name"]


def test_aliases_resolve():
    assert get_target("jetson")["name"] == "jetson-orin-nano-8gb"
    assert get_target("jetson-orin-nano-8gb") is get_target("jetson")
    assert get_target("host")["name"] == "cpu"


def test_cpu_is_the_host_and_jetson_is_not():
    assert get_target("cpu").get("is_host") is True
    assert not get_target("jetson").get("is_host")
    assert get_target("jetson")["quantization"]["int8_recipe"] == "tensorrt"


@pytest.mark.parametrize("typo,suggestion", [("jetsn", "jetson"), ("cpuu", "cpu"), ("orin-nan", "orin-nano")])
def test_unknown_target_suggests_the_near_miss(typo, suggestion):
    with pytest.raises(CompressError) as ei:
        get_target(typo)
    msg = str(ei.value)
    assert f"Did you mean '{suggestion}'" in msg and "compress targets" in msg
    assert ei.value.exit_code == 2


def test_unknown_target_far_from_everything_has_no_suggestion():
    with pytest.raises(CompressError) as ei:
        get_target("zzzzzzzzzzzz")
    assert "Did you mean" not in str(ei.value)


def test_user_profile_path_loads(tmp_path):
    f = tmp_path / "board.toml"
    f.write_text(USER_PROFILE)
    p = get_target(str(f))
    assert p["name"] == "my-board" and p["is_host"] is True and p["runtime"]["onnx_opset"] == 17


@pytest.mark.parametrize("change,where", [
    (lambda s: s.replace('[runtime]\nname = "onnxruntime"\nonnx_opset = 17\nsource = "me"\n', ""), "runtime"),
    (lambda s: s.replace('kind = "cpu"', 'kind = "toaster"'), "kind"),
    (lambda s: s.replace("onnx_opset = 17", "onnx_opset = 7"), "onnx_opset"),
    (lambda s: s.replace("schema_version = 1", "schema_version = 2"), "schema_version"),
    (lambda s: s + "\nsurprise = 1\n", "surprise"),
    (lambda s: s.replace('precisions = ["fp32", "int8"]', 'precisions = ["int4"]'), "precisions"),
])
def test_invalid_user_profile_is_a_compress_error(tmp_path, change, where):
    f = tmp_path / "bad.toml"
    f.write_text(change(USER_PROFILE))
    with pytest.raises(CompressError, match="invalid|schema|Additional|surprise") as ei:
        get_target(str(f))
    assert str(f) in str(ei.value)
    assert where in str(ei.value) or "Additional" in str(ei.value) or "required" in str(ei.value)


def test_user_profile_that_is_not_toml(tmp_path):
    f = tmp_path / "garbage.toml"
    f.write_bytes(b"name = = =\n\xff\xfe")
    with pytest.raises(CompressError, match="not valid TOML"):
        get_target(str(f))


def test_user_profile_missing(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        get_target(str(tmp_path / "nope.toml"))
