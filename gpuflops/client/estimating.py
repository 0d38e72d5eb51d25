"""What the framework callbacks share: model inspection, reporter set-up and metadata.

Framework-free, so the Lightning callback does not need transformers (nor the reverse).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from torch import nn

from gpuflops.estimate.formulas import DEFAULT_ATTENTION_FRACTION, AttentionKernel, Method
from gpuflops.estimate.spec import ModelSpec, SpecError
from gpuflops.estimate.torchmodel import ModelFacts, inspect_model


class Reporter(Protocol):
    """What the callbacks need of ``gpuflops.client.JobReporter`` (``start`` is optional)."""

    def add(self, flops: float, tokens: float = 0.0, recompute_flops: float = 0.0) -> None: ...

    def claim(self, kind: str, value: float, *, sampled_steps: int,
              evidence: str | None = None) -> None: ...

    def close(self) -> object: ...


class StepTally:
    """Running sums of one optimizer step's micro-batches."""

    def __init__(self) -> None:
        self.flops = 0.0
        self.recompute = 0.0
        self.tokens = 0
        self.micro_batches = 0

    def add(self, facts: ModelFacts, tokens: int, seq_len: float,
            attention_fraction: float) -> None:
        est = facts.estimate(tokens, seq_len, attention_fraction=attention_fraction)
        self.flops += est.total
        self.recompute += est.recompute
        self.tokens += tokens
        self.micro_batches += 1


def matmul_precision(param_precision: str | None) -> str | None:
    """What fp32 parameters' matrix products run at without autocast: tf32 when torch allows it."""
    if param_precision != "fp32":
        return param_precision
    import torch

    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def reporter_metadata(facts: ModelFacts, **more: Any) -> dict[str, Any]:
    """JobReporter metadata (protocol field names) for a model; ``None`` values dropped."""
    meta: dict[str, Any] = {
        "model": facts.spec.name, "architecture": facts.spec.architecture or None,
        "params_total": facts.params_total, "params_trainable": facts.params_trainable,
        "precision": facts.precision, "method": facts.method.value,
        "activation_checkpointing": facts.checkpointed_fraction > 0, **more,
    }
    return {k: v for k, v in meta.items() if v is not None}


class EstimatingCallback:
    """Configuration and reporter life cycle of the HF and Lightning callbacks.

    ``reporter``: any object with ``add``/``close`` (and optionally ``start``); when None a
    ``JobReporter`` is built when training begins, from ``job``, ``program``, ``socket_path``
    and the model's metadata. The callback closes the reporter when training ends.
    """

    def __init__(self, reporter: Reporter | None = None, *, job: str | None = None,
                 program: str | None = None, socket_path: str | None = None,
                 spec: ModelSpec | None = None, method: Method | str | None = None,
                 attention_fraction: float = DEFAULT_ATTENTION_FRACTION,
                 attention_kernel: AttentionKernel | str | None = None,
                 base_model_flops: float | None = None,
                 base_model_flops_source: str | None = None,
                 metadata: Mapping[str, Any] | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.reporter = reporter
        self._job, self._program, self._socket_path = job, program, socket_path
        self._spec, self._method, self._kernel = spec, method, attention_kernel
        self.attention_fraction = attention_fraction
        self._base = (base_model_flops, base_model_flops_source)
        self._extra_metadata = dict(metadata or {})
        self._log = logger or logging.getLogger(type(self).__module__)
        self.facts: ModelFacts | None = None
        self.metadata: dict[str, Any] = {}

    def _begin(self, model: nn.Module, *, compute_precision: str | None = None,
               **run: Any) -> bool:
        """Inspect the model and start the reporter; False (with a warning) if it cannot.

        ``compute_precision`` is what the matrix products run at when the framework says so
        (mixed precision): with bf16 autocast the parameters stay fp32 but every GEMM is bf16,
        and the daemon must count the tensor cores' bf16 rate, not fp32's.
        """
        try:
            self.facts = inspect_model(model, spec=self._spec, method=self._method,
                                       attention_kernel=self._kernel)
        except SpecError as exc:
            self._log.warning("gpuflops: cannot estimate this model: %s", exc)
            return False
        self.metadata = reporter_metadata(
            self.facts, base_model_flops=self._base[0], base_model_flops_source=self._base[1],
            **run, **self._extra_metadata)
        precision = compute_precision or matmul_precision(self.facts.precision)
        if precision is not None:
            self.metadata["precision"] = precision
        if self.reporter is None:
            from gpuflops.client.reporter import JobReporter

            self.reporter = JobReporter(self._job, self._program, socket_path=self._socket_path,
                                        **self.metadata)
        start = getattr(self.reporter, "start", None)
        if callable(start):
            start()
        return True

    def _close(self) -> None:
        if self.reporter is not None:
            self.reporter.close()
