"""Stage configs: every dataclass round-trips through JSON; unknown keys and other versions are refused."""
from __future__ import annotations

import dataclasses
import json

import pytest

from compressor.config import (CONFIG_VERSION, BenchConfig, CompressConfig, DataConfig, DistillConfig, ExportConfig,
                               QuantizeConfig)
from compressor.errors import CompressError

ALL = [DataConfig, DistillConfig, ExportConfig, QuantizeConfig, BenchConfig, CompressConfig]

NON_DEFAULT = {
    DataConfig: dict(source="d.npz", eval_source="ev", heldout_fraction=0.3, image_size=[4, 5], channels=3, mean=[0.1, 0.2, 0.3],
                     std=[1.0, 2.0, 3.0], seed=7),
    DistillConfig: dict(student="s.py:build", temperature=4.0, alpha=0.9, steps=12, baseline=True, device="cpu", amp=False, seed=3),
    ExportConfig: dict(opset=18, atol=1e-4, min_agreement=0.99, check_rows=10),
    QuantizeConfig: dict(recipe="cpu-s8s8", calibration_rows=7, calibrate_method="entropy", per_channel=False, seed=2),
    BenchConfig: dict(threads=1, batch_size=4, warmup_ms=1.0, warmup_runs=1, min_runs=5, min_duration_s=0.01),
    CompressConfig: dict(teacher="t.pt", teacher_arch="a.py:build", trust=True, target="cpu",
                         data=DataConfig(source="x.npz", image_size=[2, 2]), distill=DistillConfig(steps=5),
                         bench=BenchConfig(min_runs=3)),
}


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("default", [True, False], ids=["default", "changed"])
def test_round_trip_through_json(cls, default):
    cfg = cls() if default else cls(**NON_DEFAULT[cls])
    d = cfg.to_dict()
    assert d["config_version"] == CONFIG_VERSION
    back = cls.from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert type(back) is cls
    if cls is CompressConfig:
        assert isinstance(back.data, DataConfig) and isinstance(back.bench, BenchConfig)


def test_non_default_values_really_differ():
    for cls, kw in NON_DEFAULT.items():
        assert cls(**kw) != cls(), cls.__name__


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_unknown_key_is_refused(cls):
    d = cls().to_dict()
    d["no_such_option"] = 1
    with pytest.raises(CompressError, match="no_such_option"):
        cls.from_dict(d)


def test_unknown_key_in_a_nested_config_is_refused():
    d = CompressConfig().to_dict()
    d["distill"]["tempreature"] = 3
    with pytest.raises(CompressError, match="DistillConfig.*tempreature"):
        CompressConfig.from_dict(d)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_other_config_version_is_refused(cls):
    d = cls().to_dict()
    d["config_version"] = CONFIG_VERSION + 1
    with pytest.raises(CompressError, match="version"):
        cls.from_dict(d)


def test_nested_version_is_checked():
    d = CompressConfig().to_dict()
    d["bench"]["config_version"] = 99
    with pytest.raises(CompressError, match="BenchConfig"):
        CompressConfig.from_dict(d)


def test_missing_version_means_current_and_missing_keys_take_defaults():
    assert DistillConfig.from_dict({"steps": 3}) == DistillConfig(steps=3)


@pytest.mark.parametrize("value", [[1, 2], "text", None, 3])
def test_non_object_is_refused(value):
    with pytest.raises(CompressError, match="expected a JSON object"):
        BenchConfig.from_dict(value)


def test_replace_ignores_none():
    cfg = DistillConfig(steps=10)
    assert cfg.replace(steps=None, lr=0.1) == dataclasses.replace(cfg, lr=0.1)
    assert cfg.steps == 10  # the original is unchanged
