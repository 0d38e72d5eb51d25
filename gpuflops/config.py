"""Settings and every default.

Precedence, highest first: command-line flags > ``GPUFLOPS_<NAME>`` environment variables >
the ``[daemon]`` table of the TOML file (``--config`` or ``GPUFLOPS_CONFIG``) > defaults. Every
command resolves them the same way (:func:`resolve_settings`), so ``gpuflops run``, ``verify``,
``report`` and ``status`` find the socket, state directory and endpoint the daemon uses.
"""

from __future__ import annotations

import logging
import math
import os
import tomllib  # Python >= 3.11 (pyproject's requires-python)
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from gpuflops.rates import DEFAULT_HMMA_PRECISION, HMMA_PRECISIONS

DEFAULT_LISTEN = "0.0.0.0:9450"
DEFAULT_SOCKET_PATH = "/run/gpuflops/gpuflops.sock"  # the job socket, daemon and clients alike
DEFAULT_STATE_DIR = "/var/lib/gpuflops"
ENV_PREFIX = "GPUFLOPS_"  # GPUFLOPS_<SETTING NAME IN UPPER CASE>, e.g. GPUFLOPS_STATE_DIR
# Established names that predate the generic ones: clients read GPUFLOPS_SOCKET already.
ENV_ALIASES: Mapping[str, str] = {"socket_path": "GPUFLOPS_SOCKET"}
CONFIG_ENV = "GPUFLOPS_CONFIG"  # the TOML file, when no --config is given
DEFAULT_TELEMETRY_PATH = "/metrics"
# --log.level names (exporter-toolkit's) and the logging levels they stand for.
LOG_LEVELS: Mapping[str, int] = {"debug": logging.DEBUG, "info": logging.INFO,
                                 "warn": logging.WARNING, "error": logging.ERROR}
LOG_FORMATS = ("logfmt", "json")
DEMO_TRACE = "h100-demo.jsonl.gz"  # shipped in gpuflops/data; `--demo` and the replay default
# The H100 accuracy figures measured in docs/accuracy.md, the audit report's default.
# Where the kubelet serves its PodResources API; the chart mounts its directory read-only.
KUBELET_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_DCGM_ENDPOINT = "localhost:5555"  # host:port, unix:///path, or "embedded"
# Where DCGM's Python bindings live when no directory is configured.
DEFAULT_DCGM_BINDINGS: tuple[Path, ...] = (
    Path("/usr/share/datacenter-gpu-manager-4/bindings/python3"),  # DCGM 4 packages
    Path("/usr/local/dcgm/bindings/python3"),  # DCGM 3 packages
)


def demo_trace_path() -> Path:
    """The H100 trace shipped in the package."""
    return Path(str(resources.files("gpuflops") / "data" / DEMO_TRACE))


class SettingsError(ValueError):
    """A setting is invalid; the message names it."""


def check_socket_mode(mode: int) -> int:
    """``mode`` if it is a safe mode for the job socket, else ValueError saying why.

    Connecting to a Unix socket needs write permission on it: a socket any user can write to
    lets every local user report analytic work, so no bit for others is accepted."""
    if not 0 <= mode <= 0o777:
        raise ValueError(f"socket_mode {mode:#o} is not a permission mode (0 to 0o777)")
    if mode & 0o007:
        raise ValueError(f"socket_mode {mode:#o} gives other users access to the job socket; "
                         "use 0o660 with socket_group (or 0o600 for root only)")
    if mode & 0o600 != 0o600:
        raise ValueError(f"socket_mode {mode:#o} must let its owner read and write (0o600)")
    return mode


# (setting, lowest, highest, whether the lowest is allowed): physical bounds of every number.
# Seconds are bounded by a day: a longer interval, hold or period is a typo, and inf or NaN
# would stop the loop or the arithmetic that assumes them finite.
_DAY_S = 86400.0
NUMERIC_BOUNDS: tuple[tuple[str, float, float, bool], ...] = (
    ("interval_s", 0.1, 3600.0, True),
    ("clock_period_s", 0.0, 3600.0, False),
    ("pm_period_s", 0.001, 3600.0, True),
    ("process_period_s", 0.0, 3600.0, False),
    ("process_ttl_s", 0.0, 30 * _DAY_S, False),
    ("series_ttl_s", 0.0, 30 * _DAY_S, False),
    ("attribution_hold_s", 0.0, 600.0, True),
    ("analytic_split_tolerance", 0.0, 10.0, False),
    ("analytic_bound_slack", 1.0, 1000.0, True),
    ("socket_idle_s", 0.0, _DAY_S, False),
    ("replay_speed", 0.0, 10_000.0, False),
    ("ledger_commit_s", 0.0, 3600.0, True),
    ("program_refresh_s", 0.0, _DAY_S, False),
    ("central_ship_every_s", 0.0, _DAY_S, False),
)


@dataclass(frozen=True)
class Settings:
    backend: str = "auto"  # auto | nvml | dcgm | replay
    listen: str = DEFAULT_LISTEN
    # GPM sampling interval and SM clock reads within it (averaged). Chosen from measurements
    # on an H100 (docs/accuracy.md, docs/overhead.md): with the clock read every 0.05-0.1 s,
    # 0.5 s intervals were as accurate as 0.1 s ones, at a fraction of the CPU.
    interval_s: float = 0.5
    clock_period_s: float = 0.1
    # Hardware cycle counters for the clock and tensor work: "auto" uses CUPTI PM sampling where
    # cupti-python is installed and falls back to NVML's clock otherwise; "cupti" refuses to
    # start without it; "nvml" never uses it (docs/accuracy.md, docs/backends.md).
    counters: str = "auto"
    pm_period_s: float = 0.05  # PM sample period: window edges land within one period
    yield_to_profilers: bool = True  # hand GPU counters to Nsight tools while they run
    process_period_s: float = 1.0  # process list and per-process utilisation refresh
    process_ttl_s: float = 300.0  # exited processes' series age out after this
    # A job's series leave /metrics this long after its last FLOP or estimate (docs/metrics.md).
    series_ttl_s: float = 3600.0
    attribution_hold_s: float = 3.0  # how long a shared interval waits for per-process samples
    # Split a shared GPU by the analytic FLOPs its processes report, when all of them do and
    # the sum is within this tolerance of the measured FLOPs (docs/attribution.md).
    analytic_split: bool = True
    analytic_split_tolerance: float = 0.5
    # A job's analytic FLOPs may not exceed this many times what the node's GPUs can execute
    # at their physical peak since the job registered (docs/protocol.md, "Bounds").
    analytic_bound_slack: float = 4.0
    hmma_precision: str = DEFAULT_HMMA_PRECISION
    hmma_precision_per_gpu: dict[str, str] = field(default_factory=dict)
    replay_path: str | None = None
    replay_speed: float = 1.0
    replay_loop: bool = True
    socket_path: str = DEFAULT_SOCKET_PATH
    socket_group: str | None = None
    socket_mode: int = 0o660
    socket_idle_s: float = 120.0  # a job-socket connection that sends nothing this long is closed
    state_dir: str = DEFAULT_STATE_DIR
    ledger: bool = True
    # NORMAL in WAL mode survives kill -9 (the WAL is in the page cache); FULL also survives a
    # power cut at ~4 ms per commit instead of ~0.3 ms (docs/ledger.md).
    ledger_sync: str = "NORMAL"
    # Seconds between ledger commits; 0 = every sampling interval (docs/ledger.md, "Size").
    ledger_commit_s: float = 0.0
    job_socket: bool = True
    web_config: str | None = None
    telemetry_path: str = DEFAULT_TELEMETRY_PATH
    log_level: str = "info"
    log_format: str = "logfmt"
    job_sources: tuple[str, ...] = ("socket", "env", "kubernetes", "slurm", "torchrun", "systemd")
    program_config: str | None = None
    program_refresh_s: float = 10.0  # reconciliation and thresholds are recomputed this often
    devices: tuple[int, ...] | None = None
    # Pod names and labels for Kubernetes jobs (docs/attribution.md); None: pod UIDs only.
    kubelet_url: str | None = None
    kubelet_ca_file: str | None = None
    kubelet_insecure_tls: bool = False
    # The kubelet's PodResources socket (KUBELET_POD_RESOURCES_SOCKET): GPU -> pod when /pods
    # is off or fails (docs/attribution.md); None: not used. Needs the kubernetes extra.
    pod_resources_socket: str | None = None
    dcgm_endpoint: str = DEFAULT_DCGM_ENDPOINT
    dcgm_bindings: tuple[str, ...] = ()  # where DCGM's Python bindings live; () = known places
    # Fleet tier (docs/fleet.md): ship the ledger to PostgreSQL. The URL never holds a password.
    central_url: str | None = None
    central_password_file: str | None = None
    central_ship_every_s: float = 60.0  # also the span of one shipped rollup (x1.5 at most)
    node_name: str | None = None  # None: the host name
    cluster: str = "default"

    def validate(self) -> Settings:
        for name, low, high, closed in NUMERIC_BOUNDS:
            value = getattr(self, name)
            if not (math.isfinite(value) and (value >= low if closed else value > low)
                    and value <= high):
                raise SettingsError(
                    f"{name} must be a finite number in {'[' if closed else '('}{low:g}, "
                    f"{high:g}], got {value!r}")
        try:
            check_socket_mode(self.socket_mode)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        if self.devices is not None and any(d < 0 for d in self.devices):
            raise SettingsError(f"devices must be GPU indexes >= 0, got {list(self.devices)}")
        if self.backend not in ("auto", "nvml", "dcgm", "replay"):
            raise SettingsError(f"backend must be auto, nvml, dcgm or replay, not {self.backend!r}")
        if self.interval_s < 0.1:
            raise SettingsError(f"interval must be >= 0.1 s (NVML GPM limit), got {self.interval_s}")
        if not 0 < self.clock_period_s <= self.interval_s:
            raise SettingsError("clock_period_s must be in (0, interval_s]")
        if self.counters not in ("auto", "cupti", "nvml"):
            raise SettingsError(f"counters must be auto, cupti or nvml, not {self.counters!r}")
        if not 0.001 <= self.pm_period_s <= self.interval_s / 2:
            raise SettingsError("pm_period_s must be in [0.001, interval_s / 2]: a window "
                                f"needs whole PM samples, got {self.pm_period_s}")
        for key, p in [("hmma_precision", self.hmma_precision), *self.hmma_precision_per_gpu.items()]:
            if p not in HMMA_PRECISIONS:
                raise SettingsError(f"{key}: precision {p!r} is not one of {HMMA_PRECISIONS}")
        if self.ledger_sync not in ("NORMAL", "FULL"):
            raise SettingsError("ledger_sync must be NORMAL or FULL")
        if self.replay_speed <= 0:
            raise SettingsError("replay_speed must be positive")
        if self.series_ttl_s <= 0 or self.process_ttl_s <= 0:
            raise SettingsError("series_ttl_s and process_ttl_s must be positive")
        if not self.telemetry_path.startswith("/") or self.telemetry_path in ("/", "/healthz"):
            raise SettingsError(f"telemetry_path must start with / and not be / or /healthz, "
                                f"got {self.telemetry_path!r}")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if self.central_url and not self.ledger:
            raise SettingsError("--central ships the ledger: it cannot be combined with --no-ledger")
        if self.central_ship_every_s <= 0:
            raise SettingsError("central_ship_every_s must be positive")
        if not self.cluster or (self.node_name is not None and not self.node_name):
            raise SettingsError("cluster and node_name must not be empty")
        return self

    def status_url(self) -> str:
        """The metrics URL a local client reads: the listen address (a wildcard becomes
        loopback), https when the web config turns TLS on."""
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if _web_config_has_tls(self.web_config) else 'http'}://{host}:{port}" \
            f"{self.telemetry_path}"

    def with_overrides(self, **kw: Any) -> Settings:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def _web_config_has_tls(path: str | None) -> bool:
    """Whether a web-config file has a tls_server_config section (a line scan: no YAML here)."""
    if not path:
        return False
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return any(line.startswith("tls_server_config:") for line in text.splitlines())


def env_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Settings named by ``GPUFLOPS_<NAME>`` variables, parsed to their types.

    Lists are comma-separated (``GPUFLOPS_DEVICES=0,2``), tables ``k=v`` pairs
    (``GPUFLOPS_HMMA_PRECISION_PER_GPU=1=tf32``), booleans true/false/1/0/yes/no, integers
    may be octal (``0o660``); an empty value means "not set" for optional settings.
    """
    out: dict[str, Any] = {}
    for f in fields(Settings):
        names = [ENV_PREFIX + f.name.upper()]
        if f.name in ENV_ALIASES:
            names.append(ENV_ALIASES[f.name])
        name = next((n for n in names if n in environ), None)
        if name is None:
            continue
        kind = str(f.type)
        optional = kind.endswith(" | None")
        raw = environ[name].strip()
        if optional and raw == "":
            out[f.name] = None
            continue
        try:
            out[f.name] = _from_text(raw, kind.removesuffix(" | None"))
        except ValueError:
            raise SettingsError(
                f"${name}: {raw!r} is not {_WANT[kind.removesuffix(' | None')]}") from None
    return out


def _from_text(raw: str, kind: str) -> Any:
    if kind == "float":
        return float(raw)
    if kind == "int":
        return int(raw, 0)
    if kind == "bool":
        low = raw.lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(raw)
        return low in ("true", "1", "yes")
    if kind == "str":
        return raw
    items = [x.strip() for x in raw.split(",") if x.strip()]
    if kind == "tuple[str, ...]":
        return tuple(items)
    if kind == "tuple[int, ...]":
        return tuple(int(x, 0) for x in items)
    if kind == "dict[str, str]":
        pairs = [x.partition("=") for x in items]
        if any(not sep for _k, sep, _v in pairs):
            raise ValueError(raw)
        return {k.strip(): v.strip() for k, _sep, v in pairs}
    raise ValueError(kind)


def config_path(flag: str | os.PathLike[str] | None,
                environ: Mapping[str, str] = os.environ) -> Path | None:
    """The TOML file: ``--config``, else ``$GPUFLOPS_CONFIG``, else none."""
    if flag:
        return Path(flag)
    value = environ.get(CONFIG_ENV, "").strip()
    return Path(value) if value else None


def resolve_settings(config: str | os.PathLike[str] | None = None,
                     environ: Mapping[str, str] = os.environ, **flags: Any) -> Settings:
    """Flags (None = not given) > environment > TOML file > defaults; not validated."""
    path = config_path(config, environ)
    if path is not None and not path.is_file():
        raise SettingsError(f"{path}: configuration file not found")
    return load_settings(path).with_overrides(**env_settings(environ)).with_overrides(**flags)


def load_settings(path: Path | None) -> Settings:
    """Defaults, then the ``[daemon]`` table of a TOML file if given.

    Not validated here: command-line flags are applied on top, then ``validate()`` runs once.
    """
    if path is None:
        return Settings()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SettingsError(f"{path}: {e}") from None
    table = data.get("daemon", {})
    if not isinstance(table, dict):
        raise SettingsError(f"{path}: [daemon] must be a table")
    known = {f.name for f in fields(Settings)}
    unknown = set(table) - known
    if unknown:
        raise SettingsError(f"{path}: unknown settings {sorted(unknown)}")
    types = {f.name: str(f.type) for f in fields(Settings)}
    values = {}
    for key, value in table.items():
        values[key] = _typed(value, types[key].removesuffix(" | None"))
        if values[key] is None:
            raise SettingsError(f"{path}: {key} must be {_WANT[types[key].removesuffix(' | None')]}")
    return Settings(**values)


_WANT = {
    "float": "a number",
    "int": "an integer",
    "bool": "true or false",
    "str": "a string",
    "dict[str, str]": "a table of strings",
    "tuple[str, ...]": "a list of strings",
    "tuple[int, ...]": "a list of integers",
}


def _typed(value: Any, kind: str) -> Any:
    """``value`` as the setting's type, or None when TOML gave something else (no coercion)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return float(value) if is_int or isinstance(value, float) else None
    if kind == "int":
        return value if is_int else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind == "str":
        return value if isinstance(value, str) else None
    if kind == "dict[str, str]":
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        return dict(value) if ok else None
    item = {"tuple[str, ...]": str, "tuple[int, ...]": int}.get(kind)
    if item is None or not isinstance(value, list):
        return None
    if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
        return None
    return tuple(value)
