"""Multi-process training: `compress distill --nproc-per-node N` starts N workers with torchrun
(torch.distributed.run), each running the distill stage of the same run directory. The trainer shards every
global batch across ranks and DistributedDataParallel averages the gradients, so the result matches a single
process up to floating-point order; only rank 0 writes files (see _io.is_writer). Multi-node jobs are started
with torchrun directly: `torchrun --nnodes 2 --nproc-per-node 8 ... -m compressor distill ...`."""
from __future__ import annotations

import logging
import subprocess
import sys

from ..errors import CompressError

log = logging.getLogger("compressor")


def launch(run_dir, nproc: int, resume: bool) -> None:
    """Run the distill stage of run_dir in nproc local processes; raise CompressError if a worker fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "compressor", "distill-worker", str(run_dir), *(["--resume"] if resume else [])]
    log.info(f"distill: starting {nproc} processes (torchrun)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not line.startswith(("W", "E", "[", " ", "Traceback", "torch.distributed", "error:", "internal error:")):
                sys.stderr.write(line)  # the workers' progress; torchrun's own chatter goes to the log only
        proc.wait()
    except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them save their checkpoint
        proc.wait()
        raise
    for line in lines:
        log.debug(f"torchrun: {line}")
    if proc.returncode == 130:
        raise KeyboardInterrupt
    if proc.returncode != 0:
        errors = [ln for ln in lines if ln.startswith(("error:", "internal error:"))]
        first = errors[0].split(":", 1)[1].strip() if errors else f"torchrun exited with code {proc.returncode}"
        # a worker's bad-input error stays a bad-input error (exit code 2) for the caller
        kind = "input" if proc.returncode == 2 or (errors and any("exitcode  : 2 " in ln or "(exitcode: 2)" in ln for ln in lines)) else "runtime"
        raise CompressError(f"distributed training failed: {first}", hint=f"the full output is in {run_dir}/compress.log", kind=kind)


def in_torchrun() -> bool:
    """True in a process torchrun started for a job of more than one process."""
    import os

    return int(os.environ.get("WORLD_SIZE", 1)) > 1
