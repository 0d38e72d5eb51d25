"""Read what the estimator needs from a live torch model and its batches (for the callbacks).

Imports torch; the training frameworks (transformers, peft, lightning) are only inspected
through attributes, so this module works with any ``nn.Module``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gpuflops.estimate.formulas import (
    DEFAULT_ATTENTION_FRACTION,
    AttentionKernel,
    Estimate,
    Method,
    effective_seq_len,
    estimate,
)
from gpuflops.estimate.spec import ModelSpec, SpecError, spec_from_hf_config


@dataclass(frozen=True)
class ModelFacts:
    """What a training model tells about its own cost, read once when training starts."""

    spec: ModelSpec
    method: Method
    params_total: int
    params_trainable: int
    adapter_params: int
    checkpointed_fraction: float
    checkpoint_early_stop: bool
    checkpoint_skipped_params: int | None
    attention_kernel: AttentionKernel
    precision: str | None
    notes: tuple[str, ...]

    def estimate(self, tokens: int, seq_len: float, *,
                 attention_fraction: float = DEFAULT_ATTENTION_FRACTION,
                 micro_batches: int = 1) -> Estimate:
        """Analytic FLOPs for ``tokens`` real tokens in sequences of (effective) ``seq_len``."""
        est = estimate(self.spec, tokens, seq_len=seq_len, method=self.method,
                       adapter_params=self.adapter_params,
                       activation_checkpointing=self.checkpointed_fraction,
                       checkpoint_early_stop=self.checkpoint_early_stop,
                       checkpoint_skipped_params=self.checkpoint_skipped_params,
                       attention_fraction=attention_fraction,
                       attention_kernel=self.attention_kernel, micro_batches=micro_batches)
        if not self.notes:
            return est
        return Estimate(**{**est.__dict__, "assumptions": est.assumptions + self.notes})


def _hf_config(model: nn.Module) -> Any:
    for candidate in (model, getattr(model, "base_model", None),
                      getattr(getattr(model, "base_model", None), "model", None),
                      getattr(model, "model", None)):
        cfg = getattr(candidate, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    return None


def _is_4bit(model: nn.Module, cfg: Any) -> bool:
    if any(getattr(m, "is_loaded_in_4bit", False) for m in (model, getattr(model, "base_model",
                                                                          None)) if m is not None):
        return True
    quant = getattr(cfg, "quantization_config", None)
    if quant is not None:
        q = quant if isinstance(quant, Mapping) else getattr(quant, "__dict__", {})
        if q.get("load_in_4bit") or q.get("bits") == 4:
            return True
    return any(type(m).__name__ in ("Linear4bit", "LinearNF4") for m in model.modules())


def _checkpointing(model: nn.Module) -> tuple[float, bool]:
    """Share of layers checkpointed and whether torch's early stop applies (non-reentrant)."""
    flagged = [m for m in model.modules()
               if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    # HF marks the top model and each repeated layer; the layers carry the real switch.
    layers = [m for m in flagged if type(m).__mro__[1:] and any(
        c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__)]
    pool = layers or flagged
    if not pool:
        return 0.0, True
    on = [m for m in pool if m.gradient_checkpointing]
    if not on:
        return 0.0, True
    func = getattr(on[0], "_gradient_checkpointing_func", None)
    reentrant = isinstance(func, functools.partial) and bool(func.keywords.get("use_reentrant"))
    return len(on) / len(pool), not reentrant


def _adapted_tail_params(model: nn.Module, spec: ModelSpec) -> int | None:
    """Matmul params early stop skips when LoRA wraps a layer's last projection; else None.

    The last matmul of an adapted projection is the adapter's B (peft adds B·A·x after the
    base product), so early stop skips B and recomputes the base weight.
    """
    tails = {p.name for g in spec.groups for p in g.projections if p.tail}
    skipped, adapted = 0, False
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in tails):
            continue
        lora_b = getattr(module, "lora_B", None)
        base = getattr(module, "base_layer", module)
        if isinstance(lora_b, nn.ModuleDict) and len(lora_b):
            adapted = True
            skipped += sum(p.numel() for p in lora_b.parameters())
        elif isinstance(getattr(base, "weight", None), torch.Tensor):
            skipped += base.weight.numel()
    return skipped if adapted else None


def _precision(model: nn.Module) -> str | None:
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.requires_grad or p.dtype.is_floating_point:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return None
    dtype = max(counts, key=lambda k: counts[k])
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}.get(dtype, str(dtype).removeprefix("torch."))


def inspect_model(model: nn.Module, *, spec: ModelSpec | None = None,
                  method: Method | str | None = None,
                  attention_kernel: AttentionKernel | str | None = None) -> ModelFacts:
    """Derive spec, method (full/LoRA/QLoRA from trainable vs total), checkpointing, kernel."""
    notes: list[str] = []
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise SpecError("the model has no trainable parameters")
    cfg = _hf_config(model)
    if spec is None and cfg is not None:
        try:
            spec = spec_from_hf_config(cfg.to_dict(), name=str(getattr(cfg, "_name_or_path", "")
                                                                 or type(model).__name__))
        except SpecError as exc:
            notes.append(f"HF config not usable ({exc}); linear weights counted instead")
    if method is None:
        method = Method.FULL if trainable == total else (
            Method.QLORA if _is_4bit(model, cfg) else Method.LORA)
        notes.append(f"method {method.value} detected: {trainable} of {total} parameters "
                     "trainable")
    method = Method(method)
    adapter = 0 if method is Method.FULL else trainable
    if spec is None:
        frozen_linear = sum(m.weight.numel() for m in model.modules()
                            if isinstance(m, nn.Linear) and not m.weight.requires_grad)
        all_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        n = all_linear if method is Method.FULL else frozen_linear
        spec = ModelSpec.from_param_count(max(n, 1), name=type(model).__name__)
        notes.append("no HF config: N = nn.Linear weights, no attention term")
    fraction, early_stop = _checkpointing(model)
    if attention_kernel is None:
        impl = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
        attention_kernel = AttentionKernel.EAGER if impl == "eager" else AttentionKernel.FUSED
    return ModelFacts(spec=spec, method=method, params_total=total, params_trainable=trainable,
                      adapter_params=adapter, checkpointed_fraction=fraction,
                      checkpoint_early_stop=early_stop,
                      checkpoint_skipped_params=_adapted_tail_params(model, spec),
                      attention_kernel=AttentionKernel(attention_kernel),
                      precision=_precision(model), notes=tuple(notes))


def batch_tokens(input_ids: Any, attention_mask: Any = None) -> tuple[int, float] | None:
    """Real tokens of a batch and its effective sequence length; None when it has no tokens."""
    if attention_mask is not None and isinstance(attention_mask, torch.Tensor) \
            and attention_mask.dim() == 2:
        lengths = [int(x) for x in (attention_mask != 0).sum(dim=1).tolist()]
    elif isinstance(input_ids, torch.Tensor) and input_ids.dim() >= 1:
        rows = input_ids.reshape(-1, input_ids.shape[-1]) if input_ids.dim() > 1 \
            else input_ids.reshape(1, -1)
        lengths = [int(rows.shape[1])] * int(rows.shape[0])
    else:
        return None
    tokens = sum(lengths)
    if tokens == 0:
        return None
    return tokens, effective_seq_len([n for n in lengths if n])


def batch_fields(batch: Any) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` from a dict-like batch, a tuple or a tensor."""
    if isinstance(batch, Mapping) or hasattr(batch, "keys"):
        try:
            return batch.get("input_ids"), batch.get("attention_mask")
        except AttributeError:
            return None, None
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], None
    if isinstance(batch, torch.Tensor):
        return batch, None
    return None, None


def checkpointing_flag(model: nn.Module) -> bool:
    """HF's own flag where the model has it (new name first), else the module scan."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated alias in v5
                return bool(getattr(model, name))
    return _checkpointing(model)[0] > 0
