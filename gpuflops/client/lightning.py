"""PyTorch Lightning callback: publishes each training batch's analytic FLOPs.

Lightning hands the batch to ``on_train_batch_start``, so tokens come straight from it. Every
micro-batch is reported as it ends; with gradient accumulation the sum over an optimizer
step's micro-batches is that step's work (the daemon keeps counters, not steps).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import lightning.pytorch as pl

from gpuflops.client.estimating import EstimatingCallback, Reporter, StepTally
from gpuflops.compliance.reconcile import normalize_precision
from gpuflops.estimate.spec import SpecError
from gpuflops.estimate.torchmodel import batch_fields, batch_tokens


class GpuflopsLightningCallback(EstimatingCallback, pl.Callback):
    """Estimates each training batch and reports it; see ``GpuflopsCallback`` for arguments."""

    def __init__(self, reporter: Reporter | None = None, **config: Any) -> None:
        super().__init__(reporter, **config)
        self.batches: deque[StepTally] = deque(maxlen=1024)
        self._pending: tuple[int, float] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accum = int(trainer.accumulate_grad_batches)
        world = max(1, int(trainer.world_size))
        self._begin(
            pl_module, compute_precision=normalize_precision(str(trainer.precision)),
            micro_batches=accum, data_parallel=world, rank=int(trainer.global_rank),
            world_size=world, planned_steps=trainer.max_steps if trainer.max_steps > 0 else None,
        )

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
        self._close()
