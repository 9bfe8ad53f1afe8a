#!/usr/bin/env bash
# The project's own regression gate (docs/gate.md): a quick run of the built-in example on the cpu target, benched in
# interleaved rounds, gated against the committed baseline. Latency is compared as ratios inside each run, so a
# baseline made on another machine applies. Pass --update-baseline to accept new numbers (then commit the file).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1  # one thread: the same arithmetic order on every machine, and steadier timings
out=runs/ci-gate
rm -rf "$out"
compress -q distill --target cpu --steps 1500 --no-baseline --out "$out"
compress -q export "$out"
compress -q quantize "$out" --recipe cpu-u8s8  # pinned: cpu-auto picks by timing, which may differ between runs
compress -q bench "$out" --repeat 5 --min-duration 0.3 > /dev/null
compress gate "$out" --baseline benchmarks/baselines/ci/report.json --config benchmarks/baselines/ci/gate.toml \
  --junit "$out/gate.xml" --markdown "$out/gate.md" "$@"
