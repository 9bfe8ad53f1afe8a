"""One trained run of the built-in example (its teacher and mnist1d data, target cpu, a short schedule), made once in a
work folder and reused: the subject of the benchmarks that bench the same models again and again."""
from __future__ import annotations

from pathlib import Path


def quick_run(work: Path, steps: int = 300) -> Path:
    from compressor import api
    from compressor.config import CompressConfig, DistillConfig

    run = work / "run"
    if not (run / "report.json").exists():
        api.compress(CompressConfig(target="cpu", distill=DistillConfig(steps=steps, evals=3, device="cpu")), out=run)
    return run
