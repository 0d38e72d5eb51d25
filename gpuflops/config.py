"""Daemon settings: defaults, overridden by a TOML file, overridden by command-line flags."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from gpuflops.rates import DEFAULT_HMMA_PRECISION, HMMA_PRECISIONS

DEFAULT_LISTEN = "0.0.0.0:9450"
DEFAULT_SOCKET = "/run/gpuflops/gpuflops.sock"
DEFAULT_STATE_DIR = "/var/lib/gpuflops"


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


@dataclass(frozen=True)
class Settings:
    backend: str = "auto"  # auto | nvml | dcgm | replay
    listen: str = DEFAULT_LISTEN
    # GPM sampling interval and SM clock reads within it (averaged). Chosen from measurements
    # on an H100 (docs/accuracy.md, docs/overhead.md): with the clock read every 0.05-0.1 s,
    # 0.5 s intervals were as accurate as 0.1 s ones, at a fraction of the CPU.
    interval_s: float = 0.5
    clock_period_s: float = 0.1
    process_period_s: float = 1.0  # process list and per-process utilisation refresh
    process_ttl_s: float = 300.0  # exited processes' series age out after this
    attribution_hold_s: float = 3.0  # how long a shared interval waits for per-process samples
    # Split a shared GPU by the analytic FLOPs its processes report, when all of them do and
    # the sum is within this tolerance of the measured FLOPs (docs/attribution.md).
    analytic_split: bool = True
    analytic_split_tolerance: float = 0.5
    hmma_precision: str = DEFAULT_HMMA_PRECISION
    hmma_precision_per_gpu: dict[str, str] = field(default_factory=dict)
    replay_path: str | None = None
    replay_speed: float = 1.0
    replay_loop: bool = True
    socket_path: str = DEFAULT_SOCKET
    socket_group: str | None = None
    socket_mode: int = 0o660
    state_dir: str = DEFAULT_STATE_DIR
    ledger: bool = True
    # NORMAL in WAL mode survives kill -9 (the WAL is in the page cache); FULL also survives a
    # power cut at ~4 ms per commit instead of ~0.3 ms (docs/ledger.md).
    ledger_sync: str = "NORMAL"
    # Seconds between ledger commits; 0 = every sampling interval (docs/ledger.md, "Size").
    ledger_commit_s: float = 0.0
    job_socket: bool = True
    web_config: str | None = None
    job_sources: tuple[str, ...] = ("socket", "env", "kubernetes", "slurm", "torchrun", "systemd")
    program_config: str | None = None
    program_refresh_s: float = 10.0  # reconciliation and thresholds are recomputed this often
    devices: tuple[int, ...] | None = None
    # Pod names and labels for Kubernetes jobs (docs/attribution.md); None: pod UIDs only.
    kubelet_url: str | None = None
    kubelet_ca_file: str | None = None
    kubelet_insecure_tls: bool = False
    dcgm_endpoint: str = "localhost:5555"  # host:port, unix:///path, or "embedded"
    dcgm_bindings: tuple[str, ...] = ()  # where DCGM's Python bindings live; () = known places
    # Fleet tier (docs/fleet.md): ship the ledger to PostgreSQL. The URL never holds a password.
    central_url: str | None = None
    central_password_file: str | None = None
    central_ship_every_s: float = 60.0  # also the span of one shipped rollup (x1.5 at most)
    node_name: str | None = None  # None: the host name
    cluster: str = "default"

    def validate(self) -> Settings:
        if self.backend not in ("auto", "nvml", "dcgm", "replay"):
            raise ConfigError(f"backend must be auto, nvml, dcgm or replay, not {self.backend!r}")
        if self.interval_s < 0.1:
            raise ConfigError(f"interval must be >= 0.1 s (NVML GPM limit), got {self.interval_s}")
        if not 0 < self.clock_period_s <= self.interval_s:
            raise ConfigError("clock_period_s must be in (0, interval_s]")
        for key, p in [("hmma_precision", self.hmma_precision), *self.hmma_precision_per_gpu.items()]:
            if p not in HMMA_PRECISIONS:
                raise ConfigError(f"{key}: precision {p!r} is not one of {HMMA_PRECISIONS}")
        if self.ledger_sync not in ("NORMAL", "FULL"):
            raise ConfigError("ledger_sync must be NORMAL or FULL")
        if self.replay_speed <= 0:
            raise ConfigError("replay_speed must be positive")
        if self.central_url and not self.ledger:
            raise ConfigError("--central ships the ledger: it cannot be combined with --no-ledger")
        if self.central_ship_every_s <= 0:
            raise ConfigError("central_ship_every_s must be positive")
        if not self.cluster or (self.node_name is not None and not self.node_name):
            raise ConfigError("cluster and node_name must not be empty")
        return self

    def with_overrides(self, **kw: Any) -> Settings:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def load_settings(path: Path | None) -> Settings:
    """Defaults, then the ``[daemon]`` table of a TOML file if given.

    Not validated here: command-line flags are applied on top, then ``validate()`` runs once.
    """
    if path is None:
        return Settings()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    table = data.get("daemon", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [daemon] must be a table")
    known = {f.name for f in fields(Settings)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
    types = {f.name: str(f.type) for f in fields(Settings)}
    values = {}
    for key, value in table.items():
        values[key] = _typed(value, types[key].removesuffix(" | None"))
        if values[key] is None:
            raise ConfigError(f"{path}: {key} must be {_WANT[types[key].removesuffix(' | None')]}")
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
