"""DCGM's Python bindings: where they are loaded from, how their errors map, and the field ids.

The only module that imports DCGM's Python bindings (``dcgm_structs``, ``dcgm_agent``,
``dcgm_fields``, ``dcgmvalue``, shipped with DCGM, not on PyPI). They are looked up in
configurable directories and put on ``sys.path`` when a sampler is constructed, never at import
time. Every call goes through :func:`dcgm_query`, which maps ``DCGMError`` to
:class:`DcgmCallError` with a stable ``kind`` (the plumbing is shared with NVML in
sampler/base.py).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from gpuflops.config import DEFAULT_DCGM_BINDINGS
from gpuflops.model import Metric
from gpuflops.sampler.base import CallError, SamplerError, error_kinds, library_call

log = logging.getLogger(__name__)

# DCGM profiling field ids (dcgm_fields.h, DCGM_FI_PROF_*); values are ratios in [0, 1].
PROF_FIELD_IDS: dict[Metric, int] = {
    Metric.SM_ACTIVE: 1002,
    Metric.SM_OCCUPANCY: 1003,
    Metric.TENSOR_ANY: 1004,
    Metric.FP64: 1006,
    Metric.FP32: 1007,
    Metric.FP16: 1008,
    Metric.IMMA: 1013,
    Metric.HMMA: 1014,
    Metric.DFMA: 1015,
}
FIELD_METRIC = {v: k for k, v in PROF_FIELD_IDS.items()}
SM_CLOCK_FIELD = 100  # DCGM_FI_DEV_SM_CLOCK, int64 MHz

FE_GPU = 1  # DCGM_FE_GPU
FE_GPU_I = 4  # DCGM_FE_GPU_I

# DCGM return codes by name -> the stable kind gpuflops reports (sampler_errors_total{kind}).
_DCGM_ERROR_NAMES = {
    "DCGM_ST_CONNECTION_NOT_VALID": "connection_lost",
    "DCGM_ST_IN_USE": "profiler_in_use",
    "DCGM_ST_PROFILING_MULTI_PASS": "profiling_multi_pass",
    "DCGM_ST_PROFILING_NOT_SUPPORTED": "profiling_not_supported",
    "DCGM_ST_PROFILING_LIBRARY_ERROR": "profiling_library_error",
    "DCGM_ST_MODULE_NOT_LOADED": "module_not_loaded",
    "DCGM_ST_NOT_SUPPORTED": "not_supported",
    "DCGM_ST_GPU_NOT_SUPPORTED": "not_supported",
    "DCGM_ST_NO_PERMISSION": "no_permission",
    "DCGM_ST_REQUIRES_ROOT": "no_permission",
    "DCGM_ST_TIMEOUT": "timeout",
    "DCGM_ST_GPU_IS_LOST": "gpu_lost",
    "DCGM_ST_NOT_WATCHED": "not_watched",
    "DCGM_ST_NO_DATA": "no_data",
    "DCGM_ST_LIBRARY_NOT_FOUND": "library_not_found",
    "DCGM_ST_FUNCTION_NOT_FOUND": "function_not_found",
    "DCGM_ST_UNINITIALIZED": "uninitialized",
    "DCGM_ST_INIT_ERROR": "init_error",
    "DCGM_ST_DUPLICATE_KEY": "duplicate_key",
    "DCGM_ST_INSTANCE_NOT_FOUND": "instance_not_found",
}
# Kinds that mean "another tool holds the profiler": a counted gap until it lets go.
PROFILER_BUSY_KINDS = frozenset({"profiler_in_use", "profiling_multi_pass"})


class DcgmCallError(CallError):
    """A DCGM call failed; ``kind`` is stable across DCGM versions."""


@dataclass(frozen=True)
class DcgmBindings:
    """DCGM's binding modules, as loaded from its bindings directory."""

    structs: ModuleType
    agent: ModuleType
    fields: ModuleType
    value: ModuleType
    path: str
    kinds: dict[int, str] = field(default_factory=dict)


def load_bindings(paths: Sequence[Path] = DEFAULT_DCGM_BINDINGS) -> DcgmBindings:
    """Import DCGM's bindings from the first directory holding them. Raises SamplerError."""
    found = next((p for p in paths if (p / "dcgm_agent.py").is_file()), None)
    if found is None:
        raise SamplerError(
            "DCGM Python bindings not found (looked for dcgm_agent.py in "
            + ", ".join(str(p) for p in paths)
            + "); install DCGM or pass the bindings directory"
        )
    if str(found) not in sys.path:
        sys.path.insert(0, str(found))
    try:
        structs = importlib.import_module("dcgm_structs")
        agent = importlib.import_module("dcgm_agent")
        fields = importlib.import_module("dcgm_fields")
        value = importlib.import_module("dcgmvalue")
    except Exception as e:  # the bindings run code at import; any failure means unusable
        raise SamplerError(f"DCGM Python bindings in {found} failed to import: {e}") from None
    loaded_from = getattr(agent, "__file__", "") or ""
    if loaded_from and Path(loaded_from).parent != found:
        log.info("DCGM bindings already imported from %s (asked for %s)", loaded_from, found)
    kinds = error_kinds(structs, _DCGM_ERROR_NAMES)
    return DcgmBindings(structs, agent, fields, value, str(found), kinds)


def dcgm_query(b: DcgmBindings, function: str, *args: Any) -> Any:
    """Call ``dcgm_agent.<function>(*args)``, mapping every failure to DcgmCallError."""
    return library_call(b.agent, b.structs.DCGMError, b.kinds, DcgmCallError,
                        "not in these DCGM bindings", function, *args)


def parse_endpoint(endpoint: str) -> tuple[str, str | None]:
    """``embedded``, ``unix:///path``, ``/path`` or ``host[:port]`` -> (mode, address)."""
    e = endpoint.strip()
    if e == "embedded":
        return "embedded", None
    if e.startswith("unix://"):
        return "unix", e[len("unix://") :]
    if e.startswith("/"):
        return "unix", e
    if e.startswith("tcp://"):
        e = e[len("tcp://") :]
    if not e:
        raise SamplerError("empty DCGM endpoint; use host:port, unix:///path or embedded")
    return "tcp", e




def text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
