"""Analytic training FLOPs: full fine-tuning, LoRA and QLoRA, with attention and recomputation.

Per token, with N the matmul parameters a token meets (``ModelSpec.matmul_params``):
forward 2·N (a multiply and an add per weight), activation gradients 2·N, weight gradients
2·N_trainable. Full fine-tuning: 6·N (Kaplan et al. 2020, §2.1; Hoffmann et al. 2022, App. F).
LoRA/QLoRA freeze the base: 2·(N+A) + 2·(N+A) + 2·A = 4·N + 6·A for adapter parameters A
(Hu et al. 2021; QLoRA, Dettmers et al. 2023, dequantises the 4-bit base to bf16 before the
same matmuls, so it costs the same FLOPs). docs/estimator.md derives every term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from gpuflops.estimate.spec import ModelSpec, SpecError


class Method(str, Enum):
    """How the model is trained; decides which weights get gradients."""

    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


# Fraction of the s×s score matrix an attention kernel computes. 1.0 counts all of it, as
# PaLM's MFU formula, Megatron-LM and torch's FlopCounterMode do, and is the conservative side
# for a threshold. A causal kernel that skips masked blocks (FlashAttention with is_causal)
# computes about (s+1)/(2s) of it: see ``causal_fraction``.
DEFAULT_ATTENTION_FRACTION = 1.0


class AttentionKernel(str, Enum):
    """How attention's backward runs; fused kernels recompute the scores in the backward."""

    # FlashAttention / memory-efficient / torch SDPA kernels keep no s×s matrix, so their
    # backward recomputes Q·Kᵀ before dP, dV, dQ, dK: five score-sized matmuls against two
    # forward (2.5×), of which the recomputed Q·Kᵀ (0.5× forward) is recomputation.
    FUSED = "fused"
    # Eager attention saves the probabilities: backward is dP, dV, dQ, dK (2× forward).
    EAGER = "eager"


# Attention backward without recomputation (dP, dV, dQ, dK), as a multiple of the forward.
_ATTENTION_BACKWARD = 2.0
# What a kernel recomputes in the backward, as a multiple of the attention forward: the scores
# Q·Kᵀ are one of the forward's two score-sized matmuls. They are activations (the
# probabilities an eager backward reads from memory), and the Commission's guidelines for GPAI
# providers (July 2025, Annex A) let recomputation of activations be left out of the compliance
# figure, as for activation checkpointing. torch's FlopCounterMode does not count it either.
_ATTENTION_RECOMPUTE = {AttentionKernel.FUSED: 0.5, AttentionKernel.EAGER: 0.0}


def causal_fraction(seq_len: int) -> float:
    """Share of score entries on or below the diagonal: (s+1)/(2s)."""
    if seq_len <= 0:
        raise SpecError(f"seq_len must be > 0, got {seq_len}")
    return (seq_len + 1) / (2 * seq_len)


@dataclass(frozen=True)
class Estimate:
    """One analytic estimate, term by term, with everything needed to recompute it.

    ``total = forward + backward + weight_grads + attention + recompute``; forward, backward
    and weight_grads are the parameter matmuls, ``attention`` the score and value matmuls
    (forward and backward, without recomputation), ``recompute`` all recomputation of
    activations: the extra forward of checkpointed layers plus ``attention_recompute``, the
    scores a fused attention kernel recomputes in its backward.
    ``total_excluding_recompute = total - recompute`` is the figure the EU guidelines count.
    """

    method: str
    tokens: int
    seq_len: float
    matmul_params: int  # N: base matmul parameters per token
    adapter_params: int  # A: LoRA adapter parameters (0 for full fine-tuning)
    trainable_matmul_params: int  # parameters whose weight gradients are computed
    forward: float
    backward: float  # activation gradients
    weight_grads: float
    attention_forward: float
    attention: float  # forward + backward of the attention scores (3 × forward)
    attention_recompute: float  # scores a fused kernel recomputes in the backward (0.5 × fwd)
    recompute: float  # checkpointed layers' extra forward + attention_recompute
    total: float
    total_excluding_recompute: float
    assumptions: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = asdict(self)
        out["assumptions"] = list(self.assumptions)
        return out

    def scaled(self, factor: float) -> Estimate:
        """The same estimate for ``factor`` times the tokens (e.g. per step -> whole run)."""
        if not math.isfinite(factor) or factor < 0:
            raise SpecError(f"scale factor must be finite and >= 0, got {factor}")
        flops = ("forward", "backward", "weight_grads", "attention_forward", "attention",
                 "attention_recompute", "recompute", "total", "total_excluding_recompute")
        fields: dict[str, Any] = {k: getattr(self, k) * factor for k in flops}
        return Estimate(**{**asdict(self), **fields, "tokens": round(self.tokens * factor),
                           "assumptions": self.assumptions})


def estimate(spec: ModelSpec, tokens: int, *, seq_len: float, method: Method | str = Method.FULL,
             adapter_params: int = 0, activation_checkpointing: bool | float = False,
             checkpoint_early_stop: bool = True,
             checkpoint_skipped_params: int | None = None,
             attention_fraction: float = DEFAULT_ATTENTION_FRACTION,
             attention_kernel: AttentionKernel | str = AttentionKernel.FUSED,
             micro_batches: int = 1) -> Estimate:
    """FLOPs to train on ``tokens`` real (non-padding) tokens.

    ``seq_len`` is the length of the sequences the tokens came in (the attention term grows
    with it); for a batch of uneven sequences pass sum(len²)/sum(len), see ``effective_seq_len``.
    ``activation_checkpointing`` is a flag or the fraction of layers checkpointed.
    ``checkpoint_early_stop``: torch's non-reentrant checkpoint stops recomputing once the
    saved tensors exist, which skips each dense layer's MLP output projection; False for
    reentrant checkpointing, which reruns the whole layer. ``checkpoint_skipped_params``
    overrides what early stop skips (default ``spec.tail_params``): with a LoRA adapter on that
    projection the last matmul is the adapter's B, not the base weight.
    ``attention_kernel``: fused kernels (the default on GPUs) recompute the scores in the
    backward, 0.5× the attention forward on top of the 2× every kernel does; that part is
    counted in ``recompute``, not in ``attention``. Eager attention recomputes nothing.
    ``micro_batches`` only documents gradient accumulation: the FLOPs depend on tokens alone.
    """
    method = Method(method)
    kernel = AttentionKernel(attention_kernel)
    if tokens < 0:
        raise SpecError(f"tokens must be >= 0, got {tokens}")
    if not (math.isfinite(seq_len) and seq_len > 0):
        raise SpecError(f"seq_len must be > 0, got {seq_len}")
    if not 0 < attention_fraction <= 1:
        raise SpecError(f"attention_fraction must be in (0, 1], got {attention_fraction}")
    ckpt = float(activation_checkpointing)
    if not 0 <= ckpt <= 1:
        raise SpecError(f"activation_checkpointing fraction must be in [0, 1], got {ckpt}")
    if micro_batches < 1:
        raise SpecError(f"micro_batches must be >= 1, got {micro_batches}")
    if adapter_params < 0:
        raise SpecError(f"adapter_params must be >= 0, got {adapter_params}")
    if method is Method.FULL and adapter_params:
        raise SpecError("full fine-tuning has no adapter parameters")
    if method is not Method.FULL and adapter_params <= 0:
        raise SpecError(f"{method.value} needs the adapter parameter count (or a LoRA rank)")

    n, a = spec.matmul_params, adapter_params
    trainable = n if method is Method.FULL else a
    forward = 2.0 * (n + a) * tokens
    backward = 2.0 * (n + a) * tokens
    weight_grads = 2.0 * trainable * tokens
    # Per token per layer: Q·Kᵀ and P·V are each 2·s·d_attn multiply-adds.
    attn_fwd_layer = 2.0 * 2.0 * seq_len * spec.attention_dim * attention_fraction
    attention_forward = attn_fwd_layer * spec.attention_layers * tokens
    attention = (1.0 + _ATTENTION_BACKWARD) * attention_forward
    attention_recompute = _ATTENTION_RECOMPUTE[kernel] * attention_forward

    recompute = attention_recompute
    if ckpt:
        layer_work = float(spec.layer_params + a)  # adapters sit on layer matrices
        if checkpoint_early_stop:
            skipped = spec.tail_params if checkpoint_skipped_params is None \
                else checkpoint_skipped_params
            layer_work -= skipped
        recompute += ckpt * (2.0 * layer_work * tokens + attention_forward)

    total_ex = forward + backward + weight_grads + attention
    assumptions = [
        f"method {method.value}: forward 2·(N+A)·D, activation gradients 2·(N+A)·D, "
        f"weight gradients 2·{'N' if method is Method.FULL else 'A'}·D "
        f"with N={n}, A={a}, D={tokens}",
        "D counts real tokens only (padding excluded)",
        "N counts matmul weights a token meets: embedding lookups excluded, LM head included "
        "(also when tied), only routed experts in MoE layers",
        f"attention: 4·s·d_attn·fraction per token per layer forward; "
        f"s={seq_len:g}, d_attn={spec.attention_dim}, layers={spec.attention_layers}, "
        f"fraction={attention_fraction:g}; backward {_ATTENTION_BACKWARD:g}× forward "
        f"({kernel.value} kernel)",
        "elementwise work (norms, activations, softmax, loss, optimizer) not counted",
    ]
    if kernel is AttentionKernel.FUSED:
        assumptions.append("fused kernels recompute the attention scores in the backward "
                           "(0.5× forward), counted as recomputation of activations, which the "
                           "EU guidelines (Annex A) leave out: see total_excluding_recompute")
    if method is Method.QLORA:
        assumptions.append("QLoRA: 4-bit base dequantised to 16-bit before each matmul; "
                           "dequantisation is elementwise and not counted")
    if method is not Method.FULL:
        assumptions.append("activation gradients assumed for every base matmul; the layers "
                           "before the first trainable weight may skip them (over-estimate)")
    if ckpt:
        assumptions.append(
            f"activation checkpointing on {ckpt:.0%} of layers: one extra forward of them "
            + ("less each dense layer's MLP output matmul (non-reentrant early stop)"
               if checkpoint_early_stop else "(reentrant: whole layer)")
            + "; the EU guidelines allow leaving recomputation out: see total_excluding_recompute")
    if micro_batches > 1:
        assumptions.append(f"gradient accumulation over {micro_batches} micro-batches: FLOPs "
                           "depend only on the tokens of all of them")
    assumptions.extend(spec.notes)
    return Estimate(method=method.value, tokens=tokens, seq_len=seq_len, matmul_params=n,
                    adapter_params=a, trainable_matmul_params=trainable, forward=forward,
                    backward=backward, weight_grads=weight_grads,
                    attention_forward=attention_forward, attention=attention,
                    attention_recompute=attention_recompute, recompute=recompute,
                    total=total_ex + recompute, total_excluding_recompute=total_ex,
                    assumptions=tuple(assumptions))


def effective_seq_len(lengths: Sequence[int]) -> float:
    """sum(len²)/sum(len): tokens × this gives the summed s² of sequences of uneven length."""
    values = list(lengths)
    total = sum(values)
    if total <= 0:
        raise SpecError("no tokens in these sequences")
    return sum(v * v for v in values) / total
