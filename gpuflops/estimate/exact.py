"""Exact FLOPs of real steps, counted by ``torch.utils.flop_counter.FlopCounterMode``.

The only estimator module that imports torch. The counter sees every matmul, convolution and
fused attention call, forward and backward (recomputation included). It counts the full s×s
score matrix of fused attention even when the kernel is causal, as the analytic default does.
A fused kernel's backward is counted with its recomputation of the scores, so executed work
compares with ``Estimate.total``. On the meta device SDPA runs its math path, whose backward
reads the saved probabilities: there the count compares with ``total_excluding_recompute``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch.utils import flop_counter

T = TypeVar("T")


def _cpu_flash_forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                       **kwargs: Any) -> int:
    return int(flop_counter.sdpa_flop_count(query, key, value))


def _cpu_flash_backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
    return int(flop_counter.sdpa_backward_flop_count(grad_out, query, key, value))


def _cpu_attention_formulas() -> dict[Any, Any]:
    # torch's counter registers the CUDA fused-attention kernels but not the CPU one that
    # scaled_dot_product_attention picks on a CPU, so its work would go uncounted.
    aten = torch.ops.aten
    out: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_backward
    return out


@dataclass(frozen=True)
class CountedFlops:
    """FLOPs a flop counter saw, in total and per aten operator."""

    total: float
    by_operator: Mapping[str, float]


class FlopCount:
    """Context manager: counts the FLOPs of everything run inside it; ``result`` afterwards."""

    def __init__(self) -> None:
        self._mode = flop_counter.FlopCounterMode(display=False,
                                                  custom_mapping=_cpu_attention_formulas())
        self.result: CountedFlops | None = None

    def __enter__(self) -> FlopCount:
        self._mode.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._mode.__exit__(exc_type, exc, tb)
        counts = self._mode.get_flop_counts().get("Global", {})
        self.result = CountedFlops(total=float(self._mode.get_total_flops()),
                                   by_operator={str(k): float(v) for k, v in counts.items()})


def count_flops(step: Callable[[], T]) -> tuple[T, CountedFlops]:
    """Run ``step`` (one forward and backward, say) and count its FLOPs exactly."""
    with FlopCount() as counter:
        value = step()
    assert counter.result is not None
    return value, counter.result
