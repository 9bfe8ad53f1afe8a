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


# --- the profile set: figures travel with their sources ------------------------------------------------
from compressor.targets import FIGURES, NOT_PUBLISHED, figure, profile_warnings  # noqa: E402

EXPECTED = {"cpu", "jetson-orin-nano-8gb", "jetson-orin-nano-8gb-super", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb",
            "jetson-xavier-nx", "h100-sxm", "x86-avx512-vnni", "x86-avx2", "raspberry-pi-5"}


def test_the_shipped_profile_set():
    assert {p["name"] for p in list_targets()} == EXPECTED
    assert get_target("orin-nano-super")["name"] == "jetson-orin-nano-8gb-super"
    assert get_target("xavier-nx")["runtime"]["version"].startswith("8.5")
    assert get_target("h100")["kind"] == "gpu" and figure(get_target("h100"), "compute_capability") == "9.0"
    assert get_target("rpi5")["cpu_arch"] == "aarch64" and "hardware" not in get_target("avx2")


def test_every_hardware_figure_has_a_source():
    for p in list_targets():
        for key, fig in p.get("hardware", {}).items():
            assert key in FIGURES, (p["name"], key)
            assert isinstance(fig, dict) and fig["source"].strip(), (p["name"], key)
            v = fig["value"]
            assert v == NOT_PUBLISHED or isinstance(v, (int, float, str, dict)), (p["name"], key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert v >= 0


def test_figures_that_were_sourced():
    nano, sup = get_target("jetson"), get_target("jetson-orin-nano-8gb-super")
    assert figure(nano, "int8_sparse_tops") == 40 and figure(nano, "memory_bandwidth_gbps") == 68
    assert figure(sup, "int8_sparse_tops") == 67 and figure(sup, "memory_bandwidth_gbps") == 102
    assert figure(sup, "power_modes")["MAXN_SUPER"] == 25
    assert figure(get_target("agx-orin"), "int8_sparse_tops") == 275
    assert figure(get_target("xavier-nx"), "int8_dense_tops") == 21
    assert figure(get_target("orin-nx"), "memory_bandwidth_gbps") == 102.4  # 128-bit LPDDR5 at 6400 MT/s
    assert figure(get_target("orin-nx"), "int8_dense_tops") is None  # "not published" reads as no figure
    # the GPU-only dense peaks the roofline estimate uses (DLA excluded; dense = half the 2:4-sparse figure)
    assert [figure(get_target(n), "gpu_int8_dense_tops") for n in ("jetson", "jetson-super", "orin-nx", "agx-orin", "h100")] == [20, 33.5, 30, 85, 1979]


def test_generic_cpu_profiles_make_up_no_peak():
    for name in ("x86-avx512-vnni", "x86-avx2"):
        p = get_target(name)
        assert all(figure(p, k) is None for k in FIGURES), name
        assert p["requires_cpu_features"]
    assert get_target("avx2")["quantization"]["int8_recipe"] == "cpu-u8s8-reduced"  # no u8 x s8 saturation without VNNI
    assert get_target("vnni")["quantization"]["int8_recipe"] == "cpu-auto"


def _with_hardware(extra: str) -> str:
    return USER_PROFILE + "\n[hardware]\n" + extra + "\n"


@pytest.mark.parametrize("line", [
    "int8_sparse_tops = 40",                                   # a bare number: no source
    'int8_sparse_tops = { value = 40 }',                       # a table without its source
    'int8_sparse_tops = { value = 40, source = "" }',          # an empty source
    'int8_sparse_tops = { value = 40, source = "   " }',       # a blank one
    'memory_gb = { value = "lots", source = "me" }',           # only a number or "not published"
    'power_modes = { value = { MAXN = 25 } }',
])
def test_a_figure_without_a_source_is_refused(tmp_path, line):
    f = tmp_path / "board.toml"
    f.write_text(_with_hardware(line))
    with pytest.raises(CompressError, match="is invalid at hardware") as ei:
        get_target(str(f))
    assert ei.value.exit_code == 2


def test_a_figure_with_its_source_or_marked_unpublished_loads(tmp_path):
    f = tmp_path / "board.toml"
    f.write_text(_with_hardware('int8_sparse_tops = { value = 40, source = "my data sheet" }\n'
                                'memory_gb = { value = "not published", source = "my data sheet" }'))
    p = get_target(str(f))
    assert figure(p, "int8_sparse_tops") == 40 and figure(p, "memory_gb") is None


def test_unknown_int8_recipe_in_a_user_profile(tmp_path):
    f = tmp_path / "board.toml"
    f.write_text(USER_PROFILE.replace('"cpu-s8s8"', '"cpu-s8s9"'))
    with pytest.raises(CompressError, match="unknown int8_recipe 'cpu-s8s9'") as ei:
        get_target(str(f))
    assert ei.value.exit_code == 2 and "Did you mean 'cpu-s8s8'" in str(ei.value)


def _cli(*args):
    from compressor.cli import main

    return main(list(args))


def test_cli_lists_every_profile_with_figures(capsys):
    assert _cli("targets") == 0
    out = capsys.readouterr().out
    for p in list_targets():
        assert p["name"] in out and all(a in out for a in p.get("aliases", []))
    assert "3958" in out and "67" in out and "INT8 TOPS" in out


def test_cli_shows_one_profile_with_its_sources(capsys):
    assert _cli("targets", "orin-nano-super", "--text") == 0
    out = capsys.readouterr().out
    p = get_target("orin-nano-super")
    for fig in p["hardware"].values():
        assert fig["source"] in out
    assert "int8_sparse_tops: 67" in out and "MAXN_SUPER: 25 W" in out


@pytest.mark.parametrize("bad,where", [
    (lambda s: _with_hardware("int8_sparse_tops = 40"), "hardware"),
    (lambda s: s.replace('"cpu-s8s8"', '"cpu-nope"'), "int8_recipe"),
])
def test_cli_refuses_a_bad_user_profile_in_one_line_exit_2(tmp_path, capsys, bad, where):
    f = tmp_path / "board.toml"
    f.write_text(bad(USER_PROFILE))
    assert _cli("targets", str(f)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1 and where in err[0]


def test_cpu_features_this_host_lacks_are_reported():
    vnni = get_target("x86-avx512-vnni")
    assert profile_warnings(vnni, machine="x86_64", flags={"avx512_vnni", "avx2"}) == []
    lacking = profile_warnings(vnni, machine="x86_64", flags={"avx2"})
    assert len(lacking) == 1 and "lacks avx512_vnni" in lacking[0]
    other_arch = profile_warnings(get_target("raspberry-pi-5"), machine="x86_64", flags=set())
    assert len(other_arch) == 1 and "not aarch64" in other_arch[0]
    assert profile_warnings(get_target("cpu"), machine="x86_64", flags=set()) == []  # the host profile is this machine


def test_cli_warns_when_this_host_lacks_the_features(capsys, monkeypatch):
    import compressor.bench.host as host

    monkeypatch.setattr(host, "cpu_info", lambda: ("test cpu", {"avx2"}))
    assert _cli("targets", "x86-avx512-vnni", "--text") == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "avx512_vnni" in err


def test_xavier_nx_tensorrt_8_5_is_reported_and_refused_by_engine_planning():
    xavier = get_target("jetson-xavier-nx")
    assert any("older than 10" in w for w in profile_warnings(xavier))
    from compressor.bundle import _engines

    with pytest.raises(CompressError, match="TensorRT 8.5 is older than 10") as ei:
        _engines(xavier)
    assert ei.value.exit_code == 2
