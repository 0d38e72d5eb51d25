"""The metadata a ``JobReporter`` registers, checked field by field against the protocol."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from gpuflops.jobs import protocol
from gpuflops.jobs.protocol import ProtocolError


def env_int(environ: Mapping[str, str], name: str) -> int | None:
    """An integer from the environment (RANK, WORLD_SIZE, ...), None when absent or not one."""
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        return None


def validated_metadata(
    given: Mapping[str, Any], extra: Mapping[str, Any], log: logging.Logger
) -> dict[str, Any]:
    """Protocol-valid job metadata: each bad field is dropped with a warning, never raised."""
    metadata: dict[str, Any] = {}
    for name, value in given.items():
        try:
            checked = protocol.check_metadata_field(name, value)
        except ProtocolError as exc:
            log.warning("gpuflops: ignoring metadata %s", exc.detail)
            continue
        if checked is not None:
            metadata[name] = checked
    if extra:
        try:
            metadata["extra"] = protocol.check_extra(dict(extra))
        except ProtocolError as exc:
            log.warning("gpuflops: ignoring extra metadata: %s", exc.detail)
    for dependent, bound in (("params_trainable", "params_total"), ("rank", "world_size")):
        if metadata.get(dependent, -1) > metadata.get(bound, math.inf):
            log.warning("gpuflops: ignoring %s larger than %s", dependent, bound)
            del metadata[dependent]
    if metadata.get("rank") == metadata.get("world_size") and "rank" in metadata:
        del metadata["rank"]
    return metadata
