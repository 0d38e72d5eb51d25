"""``gpuflops record``: write a trace from the NVML backend."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import click

from gpuflops.cli.common import setup_logging
from gpuflops.sampler.base import SamplerError


@click.command("record")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="Trace file to write (.jsonl or .jsonl.gz).")
@click.option("--seconds", type=float, required=True, help="How long to record.")
@click.option("--interval", "interval_s", type=float, default=0.1, show_default=True,
              help="GPM interval; recordings use the finest NVML allows.")
@click.option("--clock-period", "clock_period_s", type=float, default=0.02, show_default=True)
def record_command(out: str, seconds: float, interval_s: float, clock_period_s: float) -> None:
    """Record a trace from the NVML backend."""
    from gpuflops.app.lifecycle import handle_signals
    from gpuflops.sampler.nvml import NvmlSampler
    from gpuflops.sampler.trace import TraceWriter, recording_meta

    setup_logging()
    stop = threading.Event()
    try:
        sampler = NvmlSampler(interval_s=interval_s, clock_period_s=clock_period_s, stop=stop)
    except SamplerError as e:
        raise click.ClickException(str(e)) from None
    writer = TraceWriter(Path(out), sampler.gpus(), interval_s, recording_meta(sampler))

    end = time.time() + seconds
    n = 0
    try:
        with handle_signals(stop.set):
            while time.time() < end and not stop.is_set():
                try:
                    writer.interval(sampler.sample())
                except StopIteration:
                    break
                n += 1
    finally:
        writer.close()
        sampler.close()
    click.echo(f"wrote {n} intervals for {len(sampler.gpus())} unit(s) to {out}")
