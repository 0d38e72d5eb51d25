"""Hugging Face ``Trainer`` callback: publishes each optimizer step's analytic FLOPs.

Real tokens come from every training forward of the step (attention_mask sum, else
input_ids size), read by a forward pre-hook because Trainer callbacks never see the batch.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gpuflops.client.census import Census, StepProfiler
from gpuflops.client.estimating import (  # noqa: F401 (re-exported for callers)
    EstimatingCallback,
    Reporter,
    StepTally,
    reporter_metadata,
)
from gpuflops.estimate.spec import SpecError
from gpuflops.estimate.torchmodel import batch_fields, batch_tokens
from gpuflops.jobs.protocol import CLAIM_HALF_RATE


class GpuflopsCallback(EstimatingCallback, TrainerCallback):
    """Estimates every optimizer step and reports it (flops incl. recompute, tokens, recompute).

    ``reporter``: any object with ``add``/``claim``/``close`` (and optionally ``start``); when
    None a ``JobReporter`` is built at train begin from ``job``, ``program``, ``socket_path`` and
    the model's metadata. The callback closes the reporter when training ends.

    ``census_step``: the optimizer step profiled once for the kernel census (client/census.py),
    whose half-rate share goes to the daemon as a claim; None: no census. Step 2 by default:
    steps 0 and 1 still pick kernels (cuBLAS heuristics, lazy initialisation).
    """

    def __init__(self, reporter: Reporter | None = None, *, census_step: int | None = 2,
                 **config: Any) -> None:
        super().__init__(reporter, **config)
        self.census_step = census_step
        self.census: Census | None = None
        self._profiler: StepProfiler | None = None
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

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        if self.facts is not None and state.global_step == self.census_step:
            self._profiler = StepProfiler()
            self._profiler.start()

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        self._publish()
        if self._profiler is not None:
            census, self._profiler = self._profiler.stop(), None
            self._claim(census)

    def _claim(self, census: Census | None) -> None:
        """Send the census's half-rate share of the profiled step's work (incl. recompute)."""
        if census is None or self.reporter is None or not self.steps:
            return
        self.census = census
        step = self.steps[-1]
        work = step.flops  # est.total: recomputation already in it
        if not census.usable or work <= 0:
            self._log.warning("gpuflops: kernel census unusable (profiler linked no kernels "
                              "to operators); no claim sent")
            return
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(census.kernels.items()))
        self.reporter.claim(CLAIM_HALF_RATE, min(1.0, census.half_rate_flops / work),
                            sampled_steps=1,
                            evidence=f"torch.profiler, 1 step: {kernels or 'no half-rate kernel'}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self._publish()  # a step cut short still did its work
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._close()
