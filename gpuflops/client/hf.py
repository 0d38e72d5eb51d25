"""Hugging Face ``Trainer`` callback: publishes each optimizer step's analytic FLOPs.

Real tokens come from every training forward of the step (attention_mask sum, else
input_ids size), read by a forward pre-hook because Trainer callbacks never see the batch.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gpuflops.client.estimating import (  # noqa: F401 (re-exported for callers)
    EstimatingCallback,
    Reporter,
    StepTally,
    reporter_metadata,
)
from gpuflops.estimate.spec import SpecError
from gpuflops.estimate.torchmodel import batch_fields, batch_tokens


class GpuflopsCallback(EstimatingCallback, TrainerCallback):
    """Estimates every optimizer step and reports it (flops incl. recompute, tokens, recompute).

    ``reporter``: any object with ``add``/``close`` (and optionally ``start``); when None a
    ``JobReporter`` is built at train begin from ``job``, ``program``, ``socket_path`` and the
    model's metadata. The callback closes the reporter when training ends.
    """

    def __init__(self, reporter: Reporter | None = None, **config: Any) -> None:
        super().__init__(reporter, **config)
        # The latest published steps, for inspection and tests; bounded for long runs.
        self.steps: deque[StepTally] = deque(maxlen=1024)
        self._tally = StepTally()
        self._hook: Any = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        if model is None:
            self._log.warning("gpuflops: Trainer passed no model; no estimates")
            return
        world = max(1, int(args.world_size))
        per_device = int(args.per_device_train_batch_size)
        accum = int(args.gradient_accumulation_steps)
        mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else None
        if not self._begin(
            model, compute_precision=mixed,
            global_batch_size=per_device * accum * world, micro_batches=accum,
            planned_steps=int(state.max_steps) if state.max_steps > 0 else None,
            data_parallel=world, rank=int(args.process_index), world_size=world,
        ):
            return
        self._hook = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
        if self.facts is None or not module.training:
            return
        import torch

        if not torch.is_grad_enabled():
            return
        input_ids, mask = batch_fields(kwargs)
        if input_ids is None and args:
            input_ids = args[0]
        counted = batch_tokens(input_ids, mask)
        if counted is None:
            return
        try:
            self._tally.add(self.facts, counted[0], counted[1], self.attention_fraction)
        except SpecError as exc:  # degrade: a bad batch loses its estimate, not the run
            self._log.warning("gpuflops: batch not estimated: %s", exc)

    def _publish(self) -> None:
        tally, self._tally = self._tally, StepTally()
        if tally.micro_batches == 0 or self.reporter is None:
            return
        self.reporter.add(tally.flops, tally.tokens, tally.recompute)
        self.steps.append(tally)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        self._publish()

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self._publish()  # a step cut short still did its work
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._close()
