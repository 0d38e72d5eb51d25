"""PyTorch Lightning callback: publishes each training batch's analytic FLOPs.

Lightning hands the batch to ``on_train_batch_start``, so tokens come straight from it. Every
micro-batch is reported as it ends; with gradient accumulation the sum over an optimizer
step's micro-batches is that step's work (the daemon keeps counters, not steps).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from gpuflops.client.hf import Reporter, StepTally, reporter_metadata
from gpuflops.estimate.formulas import DEFAULT_ATTENTION_FRACTION, AttentionKernel, Method
from gpuflops.estimate.spec import ModelSpec, SpecError
from gpuflops.estimate.torchmodel import ModelFacts, batch_fields, batch_tokens, inspect_model


class GpuflopsLightningCallback(pl.Callback):
    """Estimates each training batch and reports it; see ``GpuflopsCallback`` for arguments."""

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
        self._log = logger or logging.getLogger("gpuflops.client.lightning")
        self.facts: ModelFacts | None = None
        self.metadata: dict[str, Any] = {}
        self.batches: deque[StepTally] = deque(maxlen=1024)
        self._pending: tuple[int, float] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self.facts = inspect_model(pl_module, spec=self._spec, method=self._method,
                                       attention_kernel=self._kernel)
        except SpecError as exc:
            self._log.warning("gpuflops: cannot estimate this model: %s", exc)
            return
        accum = int(trainer.accumulate_grad_batches)
        world = max(1, int(trainer.world_size))
        self.metadata = reporter_metadata(
            self.facts, micro_batches=accum, data_parallel=world, rank=int(trainer.global_rank),
            world_size=world, planned_steps=trainer.max_steps if trainer.max_steps > 0 else None,
            base_model_flops=self._base[0], base_model_flops_source=self._base[1],
            **self._extra_metadata)
        if self.reporter is None:
            from gpuflops.client.reporter import JobReporter

            self.reporter = JobReporter(self._job, self._program, socket_path=self._socket_path,
                                        **self.metadata)
        start = getattr(self.reporter, "start", None)
        if callable(start):
            start()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._pending = batch_tokens(*batch_fields(batch)) if self.facts else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        counted, self._pending = self._pending, None
        if counted is None or self.facts is None or self.reporter is None:
            return
        tally = StepTally()
        try:
            tally.add(self.facts, counted[0], counted[1], self.attention_fraction)
        except SpecError as exc:
            self._log.warning("gpuflops: batch not estimated: %s", exc)
            return
        self.reporter.add(tally.flops, tally.tokens, tally.recompute)
        self.batches.append(tally)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reporter is not None:
            self.reporter.close()
