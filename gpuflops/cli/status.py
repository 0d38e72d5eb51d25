"""``gpuflops status``: a live terminal view of a daemon's /metrics (rich draws it in place).

GPUs with a column per pipe (tensor HMMA, IMMA, DFMA; FP16, FP32, FP64), processes, jobs and
programs with their threshold progress. It reads TLS and basic-auth endpoints, keeps running
through a daemon restart (it shows the error and retries), and refuses a URL that is not a
gpuflops metrics endpoint with a one-line error.
"""

from __future__ import annotations

import base64
import os
import ssl
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gpuflops.cli.common import config_option, settings_or_exit

PIPES = ("hmma", "imma", "dfma", "fp16", "fp32", "fp64")
PASSWORD_ENV = "GPUFLOPS_STATUS_PASSWORD"


class StatusError(Exception):
    """The URL could not be read, or what it served is not gpuflops metrics. ``permanent``:
    waiting will not help (a wrong URL or credentials), as opposed to a daemon not up yet."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass
class GpuRow:
    gpu: str
    activity: dict[str, float] = field(default_factory=dict)
    clock_hz: float | None = None
    flops_per_s: float | None = None
    flops_total: float = 0.0
    pipe_flops: dict[str, float] = field(default_factory=dict)
    processes: list[tuple[str, str, float]] = field(default_factory=list)  # pid, comm, flops
    unattributed: float = 0.0
    available: bool = True
    reason: str = ""
    gaps: int = 0


@dataclass(frozen=True)
class JobRow:
    job_id: str
    program: str
    measured: float
    analytic: float | None
    ratio: float | None


@dataclass(frozen=True)
class ProgramRow:
    program: str
    compliance: float
    threshold: float | None
    rule: str
    ratio: float | None


@dataclass
class StatusView:
    gpus: dict[str, GpuRow]
    jobs: list[JobRow]
    programs: list[ProgramRow]
    version: str = ""
    backend: str = ""


def parse_status(text: str) -> StatusView:
    """A /metrics text into what the view shows; StatusError when it is not gpuflops'."""
    from prometheus_client.parser import text_string_to_metric_families

    gpus: dict[str, GpuRow] = defaultdict(lambda: GpuRow(""))
    jobs: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    progs: dict[str, dict[str, float | str]] = defaultdict(dict)
    view = StatusView({}, [], [])
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError, TypeError, IndexError...
        raise StatusError(f"not Prometheus metrics ({type(e).__name__}: {e})",
                          permanent=True) from None
    for fam in families:
        for s in fam.samples:
            lab = s.labels
            if s.name == "gpuflops_build_info":
                view.version, view.backend = lab.get("version", ""), lab.get("backend", "")
            elif s.name.startswith("gpuflops_job_"):
                key = (lab.get("job_id", ""), lab.get("program", ""))
                jobs[key][s.name.removeprefix("gpuflops_job_")] = s.value
            elif s.name == "gpuflops_program_flops_total" and lab.get("basis") == "compliance":
                progs[lab["program"]]["compliance"] = s.value
            elif s.name == "gpuflops_program_threshold_flops":
                progs[lab["program"]].update(threshold=s.value, rule=lab.get("rule", ""))
            elif s.name == "gpuflops_program_threshold_ratio":
                progs[lab["program"]]["ratio"] = s.value
            elif "gpu" in lab:
                _gpu_sample(gpus, s.name, lab, s.value)
    if not view.version:
        raise StatusError("not a gpuflops metrics endpoint (no gpuflops_build_info series)",
                          permanent=True)
    view.gpus = dict(gpus)
    view.jobs = [JobRow(j, p, v.get("measured_flops_total", 0.0), v.get("analytic_flops_total"),
                        v.get("reconcile_ratio")) for (j, p), v in sorted(jobs.items())]
    view.programs = [ProgramRow(p, float(v.get("compliance", 0.0)),
                                float(v["threshold"]) if "threshold" in v else None,
                                str(v.get("rule", "")),
                                float(v["ratio"]) if "ratio" in v else None)
                     for p, v in sorted(progs.items())]
    return view


def _gpu_sample(gpus: dict[str, GpuRow], name: str, lab: dict[str, str], value: float) -> None:
    row = gpus[lab["gpu"]]
    row.gpu = lab["gpu"]
    if name == "gpuflops_gpu_activity_ratio":
        row.activity[lab["metric"]] = value
    elif name == "gpuflops_gpu_sm_clock_hz":
        row.clock_hz = value
    elif name == "gpuflops_gpu_flops_per_second":
        row.flops_per_s = value
    elif name == "gpuflops_gpu_flops_total":
        row.flops_total += value
        row.pipe_flops[lab["pipe"]] = row.pipe_flops.get(lab["pipe"], 0.0) + value
    elif name == "gpuflops_process_flops_total":
        row.processes.append((lab["pid"], lab["comm"], value))
    elif name == "gpuflops_unattributed_flops_total":
        row.unattributed = value
    elif name == "gpuflops_gpu_tensor_activity_available":
        row.available = value == 1
        row.reason = lab.get("reason", "")
    elif name == "gpuflops_sampler_gaps_total":
        row.gaps += int(value)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to read: TLS trust, client certificate, basic auth."""

    url: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    user: str | None = None
    password: str | None = None

    def fetch(self, timeout_s: float = 5.0) -> StatusView:
        req = urllib.request.Request(self.url, headers={"Accept": "text/plain"})
        if self.user is not None:
            token = base64.b64encode(f"{self.user}:{self.password or ''}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        context = None
        if self.url.startswith("https:"):
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s, context=context) as r:
                ctype = r.headers.get("Content-Type", "")
                body = r.read()
        except urllib.error.HTTPError as e:
            hint = " (give --user and a password)" if e.code == 401 else ""
            raise StatusError(f"{self.url}: HTTP {e.code} {e.reason}{hint}",
                              permanent=400 <= e.code < 500) from None
        except (OSError, ValueError) as e:
            raise StatusError(f"cannot read {self.url}: {getattr(e, 'reason', e)}") from None
        if not ctype.startswith(("text/plain", "application/openmetrics-text")):
            raise StatusError(f"{self.url} is not a metrics endpoint (Content-Type {ctype!r}); "
                              f"the daemon serves them at /metrics", permanent=True)
        try:
            return parse_status(body.decode("utf-8"))
        except (StatusError, UnicodeDecodeError) as e:
            raise StatusError(f"{self.url}: {e}", permanent=True) from None


def _eng(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {prefix}{unit}"
    return f"{v:.0f} {unit}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _bar(ratio: float, width: int = 20) -> str:
    filled = min(width, max(0, round(ratio * width)))
    return "█" * filled + "░" * (width - filled)


def render(view: StatusView, error: str | None = None, url: str = "") -> RenderableType:
    """The whole screen as one renderable."""
    parts: list[RenderableType] = []
    head = Text(f"gpuflops {view.version} ({view.backend})  {url}", style="bold")
    if error:
        head.append(f"\n{error}; retrying", style="bold red")
    parts.append(head)
    gpus = Table(title="GPUs: pipe activity over the last interval", title_justify="left",
                 header_style="bold", box=box.SIMPLE_HEAD)
    for col in ("GPU", *PIPES, "SM", "clock", "FLOP/s", "total FLOPs", "gaps"):
        gpus.add_column(col, justify="left" if col == "GPU" else "right", no_wrap=True)
    procs = Table(title="Processes and unattributed work", title_justify="left",
                  header_style="bold", box=box.SIMPLE_HEAD)
    for col in ("GPU", "pid", "command", "FLOPs"):
        procs.add_column(col, justify="right" if col in ("pid", "FLOPs") else "left")
    notes = Text()
    for key in sorted(view.gpus):
        r = view.gpus[key]
        a = r.activity
        gpus.add_row(key, *(_pct(a.get(p)) for p in PIPES), _pct(a.get("sm_active")),
                     f"{r.clock_hz / 1e6:.0f} MHz" if r.clock_hz else "-",
                     _eng(r.flops_per_s, "FLOP/s"), _eng(r.flops_total, "FLOP"), str(r.gaps))
        if not r.available:
            notes.append(f"GPU {key}: tensor activity unavailable: {r.reason}\n", style="yellow")
        for pid, comm, flops in sorted(r.processes, key=lambda p: -p[2]):
            procs.add_row(key, pid, comm, _eng(flops, "FLOP"))
        if r.unattributed:
            procs.add_row(key, "-", "unattributed", _eng(r.unattributed, "FLOP"))
    parts += [gpus if view.gpus else Text("no GPUs reported"), notes, procs]
    jobs = Table(title="Jobs (measured beside analytic)", title_justify="left",
                 header_style="bold", box=box.SIMPLE_HEAD)
    for col in ("job_id", "program", "measured", "analytic", "measured/analytic"):
        jobs.add_column(col, justify="left" if col in ("job_id", "program") else "right")
    for j in view.jobs:
        jobs.add_row(j.job_id, j.program, _eng(j.measured, "FLOP"), _eng(j.analytic, "FLOP"),
                     "-" if j.ratio is None else f"{j.ratio:.3f}")
    progs = Table(title="Programs against their thresholds (this node)", title_justify="left",
                  header_style="bold", box=box.SIMPLE_HEAD)
    for col in ("program", "compliance FLOPs", "threshold", "rule", "progress"):
        progs.add_column(col, justify="right" if col in ("compliance FLOPs", "threshold") else "left")
    for p in view.programs:
        progress = "-" if p.ratio is None else f"{_bar(p.ratio)} {p.ratio:.3%}"
        progs.add_row(p.program, _eng(p.compliance, "FLOP"), _eng(p.threshold, "FLOP"), p.rule,
                      progress)
    parts += [jobs, progs]
    return Group(*parts)


def render_text(view: StatusView, width: int = 140, error: str | None = None, url: str = "") -> str:
    """The view as plain text (``--once`` and tests)."""
    console = Console(width=width, color_system=None, force_terminal=False, record=True,
                      file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the console
    try:
        console.print(render(view, error, url))
        return console.export_text().rstrip("\n")
    finally:
        console.file.close()


@click.command("status")
@click.option("--url", default=None,
              help="Metrics URL [the daemon's listen address, as the daemon resolves it].")
@config_option
@click.option("--once", is_flag=True, help="Print one view and exit.")
@click.option("--wait", "wait_s", type=float, default=0.0, show_default=True,
              help="With --once: retry this many seconds until the daemon answers.")
@click.option("--interval", "interval_s", type=float, default=1.0, show_default=True)
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="CA bundle that signed the daemon's certificate.")
@click.option("--cert-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Client certificate, when the daemon requires one.")
@click.option("--key-file", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--insecure", is_flag=True, help="Do not verify the daemon's certificate.")
@click.option("--user", default=None, help="Basic-auth user.")
@click.option("--password-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help=f"File holding the basic-auth password [${PASSWORD_ENV}].")
def status_command(url: str | None, config_path: str | None, once: bool, wait_s: float,
                   interval_s: float, ca_file: str | None, cert_file: str | None,
                   key_file: str | None, insecure: bool, user: str | None,
                   password_file: str | None) -> None:
    """Live view of each GPU (a column per pipe), processes, jobs and programs."""
    if url is None:
        url = settings_or_exit(config_path).status_url()
    password = (Path(password_file).read_text().rstrip("\n") if password_file
                else os.environ.get(PASSWORD_ENV))
    endpoint = Endpoint(url, ca_file, cert_file, key_file, insecure, user, password)
    if once:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                view = endpoint.fetch()
                break
            except StatusError as e:
                if time.monotonic() >= deadline or e.permanent:
                    raise click.ClickException(str(e)) from None
                time.sleep(0.2)
        import shutil

        width = max(100, shutil.get_terminal_size((140, 40)).columns)
        click.echo(render_text(view, width=width, url=url))
        return
    _live(endpoint, interval_s)


def _live(endpoint: Endpoint, interval_s: float) -> None:
    """Redraw in place (no clearing, so no flicker) until Ctrl-C; a failed read shows the
    error above the last good view and retries: a restarted daemon comes back by itself."""
    error: str | None = None
    try:
        view = endpoint.fetch()
    except StatusError as e:
        if e.permanent:  # a wrong URL or credentials are not something to wait for
            raise click.ClickException(str(e)) from None
        view, error = StatusView({}, [], []), str(e)
    with Live(render(view, error, endpoint.url), auto_refresh=False, screen=True,
              redirect_stderr=False) as live:
        try:
            while True:
                time.sleep(interval_s)
                try:
                    view = endpoint.fetch()
                    error = None
                except StatusError as e:
                    error = str(e)
                live.update(render(view, error, endpoint.url), refresh=True)
        except KeyboardInterrupt:
            pass
