"""Which units DCGM offers (whole GPUs or MIG instances) and which activity fields each reports."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gpuflops.model import Metric
from gpuflops.rates import ARCHITECTURE_CODES
from gpuflops.sampler.base import unit_info
from gpuflops.sampler.dcgm.bindings import FE_GPU, FE_GPU_I, FIELD_METRIC, DcgmCallError, text
from gpuflops.sampler.dcgm.windows import Unit

log = logging.getLogger(__name__)

Query = Callable[..., Any]  # (function name, *args) -> result, raising DcgmCallError
SmCountFor = Callable[[int, int | None], "int | None"]  # (GPU index, GPU instance id) -> SMs

# Datasheet SM counts by marketing name, for whole GPUs when the daemon supplies none (DCGM has
# no SM-count field). First match wins, so longer names come first.
_DATASHEET_SMS: tuple[tuple[str, int], ...] = (
    ("H100 PCIe", 114),
    ("H100", 132),
    ("H200", 132),
    ("GH200", 132),
    ("B200", 148),
    ("A100", 108),
    ("A30", 56),
    ("L40S", 142),
    ("L40", 142),
    ("L4", 58),
    ("A10", 72),
    ("V100", 80),
    ("T4", 40),
)


def enumerate_units(
    query: Query, handle: Any, devices: list[int] | None, sm_count_for: SmCountFor | None
) -> list[Unit]:
    """Whole GPUs, or their MIG instances, that DCGM offers, with the fields each reports."""
    units: list[Unit] = []
    gpu_ids = query("dcgmGetAllSupportedDevices", handle)
    try:
        hierarchy = query("dcgmGetGpuInstanceHierarchy", handle)
        entries = [hierarchy.entityList[i] for i in range(hierarchy.count)]
    except DcgmCallError as e:
        log.info("DCGM GPU instance hierarchy unavailable (%s); treating GPUs as whole", e)
        entries = []
    for gpu_id in gpu_ids:
        if devices is not None and gpu_id not in devices:
            continue
        try:
            units.extend(_units_of(query, handle, int(gpu_id), entries, sm_count_for))
        except DcgmCallError as e:
            log.warning("gpu %d: cannot be enumerated through DCGM (%s); skipping it", gpu_id, e)
    return units


def _units_of(
    query: Query, handle: Any, gpu_id: int, entries: list[Any], sm_count_for: SmCountFor | None
) -> list[Unit]:
    attrs = query("dcgmGetDeviceAttributes", handle, gpu_id)
    name = text(attrs.identifiers.deviceName)
    uuid = text(attrs.identifiers.uuid)
    try:
        arch = ARCHITECTURE_CODES.get(
            int(query("dcgmGetGpuChipArchitecture", handle, gpu_id)), "unknown"
        )
    except DcgmCallError:
        arch = "unknown"
    fields, reason = _profiling_support(query, handle, gpu_id, arch)
    metrics = frozenset(fields.values())
    instances = [
        e
        for e in entries
        if e.entity.entityGroupId == FE_GPU_I
        and e.parent.entityGroupId == FE_GPU
        and e.parent.entityId == gpu_id
    ]
    if not (attrs.settings.migModeEnabled and instances):
        info = unit_info(gpu_id, uuid, name, arch, _sms(sm_count_for, gpu_id, None, name), metrics, reason)
        return [Unit(info, FE_GPU, gpu_id, gpu_id, fields)]
    units = []
    for e in instances:
        index = int(e.info.nvmlGpuIndex)
        gi = int(e.info.nvmlInstanceId)
        sms = _sms(sm_count_for, index, gi, name)
        info = unit_info(index, uuid, name, arch, sms, metrics, reason, gpu_instance_id=gi)
        units.append(Unit(info, FE_GPU_I, int(e.entity.entityId), gpu_id, fields))
    return units


def _profiling_support(
    query: Query, handle: Any, gpu_id: int, arch: str
) -> tuple[dict[int, Metric], str | None]:
    try:
        groups = query("dcgmProfGetSupportedMetricGroups", handle, gpu_id)
    except DcgmCallError as e:
        return {}, f"DCGM profiling not available ({e.kind}); tensor activity unavailable on {arch}"
    supported: set[int] = set()
    for i in range(groups.numMetricGroups):
        mg = groups.metricGroups[i]
        supported.update(int(mg.fieldIds[j]) for j in range(mg.numFieldIds))
    fields = {f: m for f, m in FIELD_METRIC.items() if f in supported}
    if not fields:
        return {}, f"DCGM profiling reports no activity fields on this {arch} GPU"
    missing = sorted(m.value for f, m in FIELD_METRIC.items() if f not in supported)
    if missing:
        log.info("gpu %d: DCGM does not offer %s on this %s GPU", gpu_id, missing, arch)
    return fields, None


def _sms(sm_count_for: SmCountFor | None, index: int, gi: int | None, name: str) -> int | None:
    if sm_count_for is not None:
        n = sm_count_for(index, gi)
        if n:
            return n
    if gi is not None:
        return None  # a MIG instance's SMs depend on its profile: only the caller knows
    return next((n for sub, n in _DATASHEET_SMS if sub in name), None)
