"""Runs an MPS control daemon for the length of a block, for benchmarks on the GPU machine.

The GPU's compute mode and settings are not touched: clients that find the daemon's pipe
directory in their environment join it; others keep their own contexts.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def mps_daemon(workdir: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Start ``nvidia-cuda-mps-control -d`` with its pipe and log directories under ``workdir``;
    yield ``env`` extended with those directories (give it to the clients); quit it on exit."""
    env = dict(env)
    for var, sub in (("CUDA_MPS_PIPE_DIRECTORY", "mps-pipe"), ("CUDA_MPS_LOG_DIRECTORY", "mps-log")):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(workdir / sub)
    subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True)
    try:
        yield env
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env=env, check=False)
        time.sleep(1.0)
