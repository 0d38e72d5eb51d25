"""``gpuflops status``: reads a daemon's /metrics and renders a per-GPU table."""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

import click

from gpuflops.config import DEFAULT_STATUS_URL


@dataclass
class GpuRow:
    gpu: str
    activity: dict[str, float] = field(default_factory=dict)
    clock_hz: float | None = None
    flops_per_s: float | None = None
    flops_total: float = 0.0
    processes: list[tuple[str, str, float]] = field(default_factory=list)  # pid, comm, flops
    unattributed: float = 0.0
    available: bool = True
    reason: str = ""
    gaps: int = 0


def parse_status(text: str) -> dict[str, GpuRow]:
    from prometheus_client.parser import text_string_to_metric_families

    rows: dict[str, GpuRow] = defaultdict(lambda: GpuRow(""))
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            gpu = s.labels.get("gpu")
            if gpu is None:
                continue
            row = rows[gpu]
            row.gpu = gpu
            if s.name == "gpuflops_gpu_activity_ratio":
                row.activity[s.labels["metric"]] = s.value
            elif s.name == "gpuflops_gpu_sm_clock_hz":
                row.clock_hz = s.value
            elif s.name == "gpuflops_gpu_flops_per_second":
                row.flops_per_s = s.value
            elif s.name == "gpuflops_gpu_flops_total":
                row.flops_total += s.value
            elif s.name == "gpuflops_process_flops_total":
                row.processes.append((s.labels["pid"], s.labels["comm"], s.value))
            elif s.name == "gpuflops_unattributed_flops_total":
                row.unattributed = s.value
            elif s.name == "gpuflops_gpu_tensor_activity_available":
                row.available = s.value == 1
                row.reason = s.labels.get("reason", "")
            elif s.name == "gpuflops_sampler_gaps_total":
                row.gaps += int(s.value)
    return dict(rows)


def fetch_status(url: str, timeout_s: float = 5.0) -> dict[str, GpuRow]:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return parse_status(r.read().decode())


def _eng(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {prefix}{unit}"
    return f"{v:.0f} {unit}"


def render(rows: dict[str, GpuRow]) -> str:
    if not rows:
        return "no GPUs reported"
    out = [
        f"{'GPU':<8}{'tensor':>8}{'hmma':>7}{'fp32':>7}{'sm':>7}{'clock':>11}"
        f"{'rate':>17}{'total':>15}{'gaps':>6}"
    ]
    for gpu in sorted(rows):
        r = rows[gpu]
        a = r.activity

        def pct(m: str, a: dict[str, float] = a) -> str:
            return f"{a[m] * 100:.0f}%" if m in a else "-"

        out.append(
            f"{gpu:<8}{pct('tensor_any'):>8}{pct('hmma'):>7}{pct('fp32'):>7}{pct('sm_active'):>7}"
            f"{(f'{r.clock_hz / 1e6:.0f} MHz' if r.clock_hz else '-'):>11}"
            f"{_eng(r.flops_per_s, 'FLOP/s'):>17}{_eng(r.flops_total, 'FLOP'):>15}{r.gaps:>6}"
        )
        if not r.available:
            out.append(f"    tensor activity unavailable: {r.reason}")
        for pid, comm, flops in sorted(r.processes, key=lambda p: -p[2]):
            out.append(f"{f'    pid {pid:<8} {comm}':<65}{_eng(flops, 'FLOP'):>15}")
        if r.unattributed:
            out.append(f"{'    unattributed':<65}{_eng(r.unattributed, 'FLOP'):>15}")
    return "\n".join(out)


@click.command("status")
@click.option("--url", default=DEFAULT_STATUS_URL, show_default=True)
@click.option("--once", is_flag=True, help="Print one table and exit.")
@click.option("--interval", "interval_s", type=float, default=1.0, show_default=True)
def status_command(url: str, once: bool, interval_s: float) -> None:
    """Live terminal view of each GPU: activity, clock, TFLOP/s, cumulative FLOPs, processes."""
    while True:
        try:
            text = render(fetch_status(url))
        except OSError as e:
            raise click.ClickException(f"cannot read {url}: {e}") from None
        if once:
            click.echo(text)
            return
        click.clear()
        click.echo(text)
        time.sleep(interval_s)
