"""Composition root: ``build(settings) -> Daemon`` wires every real object once (assemble.py);
``run(settings)`` is the daemon process: startup, signals, sd_notify, shutdown (lifecycle.py)."""

from gpuflops.app.assemble import build
from gpuflops.app.daemon import Daemon
from gpuflops.app.lifecycle import run

__all__ = ["Daemon", "build", "run"]
