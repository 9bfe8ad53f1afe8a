#!/usr/bin/env bash
# The project's own regression gate (docs/gate.md): a quick run of the built-in example on the cpu target, gated against
# the committed baseline bundle benchmarks/baselines/ci/ (report.json, the ONNX/TorchScript files, the latency sample).
# The gate re-times the baseline's models beside this run's on this machine, so the bundle may come from any CPU.
# Pass --update-baseline to accept new numbers (then commit the folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1  # one thread: the same arithmetic order on every machine, and steadier timings
out=runs/ci-gate
rm -rf "$out"
compress -q distill --target cpu --steps 1500 --no-baseline --out "$out"
compress -q export "$out"
compress -q quantize "$out" --recipe cpu-u8s8  # pinned: cpu-auto picks by timing, which may differ between runs
compress -q bench "$out" --repeat 3 --min-duration 0.3 > /dev/null  # accuracy, sizes and the latency sample
compress gate "$out" --baseline benchmarks/baselines/ci --config benchmarks/baselines/ci/gate.toml \
  --junit "$out/gate.xml" --markdown "$out/gate.md" "$@"
