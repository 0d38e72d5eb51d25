"""Hugging Face ``Trainer`` callback: publishes each optimizer step's analytic FLOPs.

Real tokens come from every training forward of the step (attention_mask sum, else
input_ids size), read by a forward pre-hook because Trainer callbacks never see the batch.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gpuflops.estimate.formulas import DEFAULT_ATTENTION_FRACTION, AttentionKernel, Method
from gpuflops.estimate.spec import ModelSpec, SpecError
from gpuflops.estimate.torchmodel import ModelFacts, batch_fields, batch_tokens, inspect_model


class Reporter(Protocol):
    """What the callbacks need of ``gpuflops.client.JobReporter`` (``start`` is optional)."""

    def add(self, flops: float, tokens: float = 0.0, recompute_flops: float = 0.0) -> None: ...

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


def reporter_metadata(facts: ModelFacts, **more: Any) -> dict[str, Any]:
    """JobReporter metadata (protocol field names) for a model; ``None`` values dropped."""
    meta: dict[str, Any] = {
        "model": facts.spec.name, "architecture": facts.spec.architecture or None,
        "params_total": facts.params_total, "params_trainable": facts.params_trainable,
        "precision": facts.precision, "method": facts.method.value,
        "activation_checkpointing": facts.checkpointed_fraction > 0, **more,
    }
    return {k: v for k, v in meta.items() if v is not None}


class GpuflopsCallback(TrainerCallback):
    """Estimates every optimizer step and reports it (flops incl. recompute, tokens, recompute).

    ``reporter``: any object with ``add``/``close`` (and optionally ``start``); when None a
    ``JobReporter`` is built at train begin from ``job``, ``program``, ``socket_path`` and the
    model's metadata. The callback closes the reporter when training ends.
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
        self._log = logger or logging.getLogger("gpuflops.client.hf")
        self.facts: ModelFacts | None = None
        self.metadata: dict[str, Any] = {}
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
        try:
            self.facts = inspect_model(model, spec=self._spec, method=self._method,
                                       attention_kernel=self._kernel)
        except SpecError as exc:
            self._log.warning("gpuflops: cannot estimate this model: %s", exc)
            return
        world = max(1, int(args.world_size))
        per_device = int(args.per_device_train_batch_size)
        accum = int(args.gradient_accumulation_steps)
        self.metadata = reporter_metadata(
            self.facts, global_batch_size=per_device * accum * world, micro_batches=accum,
            planned_steps=int(state.max_steps) if state.max_steps > 0 else None,
            data_parallel=world, rank=int(args.process_index), world_size=world,
            base_model_flops=self._base[0], base_model_flops_source=self._base[1],
            **self._extra_metadata)
        if self.reporter is None:
            from gpuflops.client.reporter import JobReporter

            self.reporter = JobReporter(self._job, self._program, socket_path=self._socket_path,
                                        **self.metadata)
        start = getattr(self.reporter, "start", None)
        if callable(start):
            start()
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
        if self.reporter is not None:
            self.reporter.close()
