"""``--backend auto``: GPM where it works, else DCGM profiling, else NVML without tensor activity.

Never falls back to a replay: a node that cannot measure says so and reports gaps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from gpuflops.sampler.base import Sampler, SamplerError

log = logging.getLogger(__name__)

SamplerFactory = Callable[[], Sampler]


class BackendSettings(Protocol):
    """The settings select_backend reads (the daemon's config object satisfies it)."""

    @property
    def backend(self) -> str:  # "auto", "nvml" or "dcgm"
        ...


def _measures(s: Sampler) -> bool:
    units = s.gpus()
    return bool(units) and all(u.metrics for u in units)


def _reasons(s: Sampler) -> str:
    return "; ".join(f"gpu {u.key}: {u.unavailable_reason}" for u in s.gpus() if not u.metrics)


def select_backend(settings: BackendSettings, *, nvml: SamplerFactory, dcgm: SamplerFactory) -> Sampler:
    """Build the sampler ``settings.backend`` asks for; for ``auto``, the best that works.

    ``nvml`` and ``dcgm`` build the backends with the daemon's options (the composition root
    owns the real constructors). Raises SamplerError when nothing can sample at all.
    """
    choice = settings.backend
    if choice == "nvml":
        return nvml()
    if choice == "dcgm":
        return dcgm()
    if choice != "auto":
        raise SamplerError(f"select_backend builds nvml, dcgm or auto, not {choice!r}")

    nv: Sampler | None = None
    why_not: list[str] = []
    try:
        nv = nvml()
    except SamplerError as e:
        why_not.append(f"nvml: {e}")
    if nv is not None:
        if _measures(nv):
            log.info("backend auto: chose nvml (GPM tensor/pipe activity works on every GPU)")
            return nv
        why_not.append(f"nvml GPM: {_reasons(nv)}")
    try:
        dc = dcgm()
    except SamplerError as e:
        why_not.append(f"dcgm: {e}")
    else:
        if _measures(dc):
            log.info("backend auto: chose dcgm (profiling fields available; %s)", "; ".join(why_not))
            if nv is not None:
                nv.close()
            return dc
        why_not.append(f"dcgm profiling: {_reasons(dc)}")
        dc.close()
    if nv is not None:
        log.warning(
            "backend auto: chose nvml WITHOUT tensor activity: FLOPs cannot be measured on this "
            "node and every interval is reported as a gap (%s)",
            "; ".join(why_not),
        )
        return nv
    raise SamplerError("no backend can sample this node: " + "; ".join(why_not))
