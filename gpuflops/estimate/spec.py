"""Model shapes for the analytic estimator: matmul parameters per token, attention width, layers.

A ``ModelSpec`` counts what a token meets in matrix multiplications, because that is what both
the 6·N·D rule and ``torch.utils.flop_counter`` count: the input embedding is a lookup (no
FLOPs), the LM head is a d×V matmul for every token even when its weight is tied to the
embedding, and only the experts a token is routed to count in a mixture-of-experts layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SpecError(ValueError):
    """A model description lacks a value, has a bad one, or describes an unsupported model."""


@dataclass(frozen=True)
class Projection:
    """One weight matrix: ``d_in`` × ``d_out``, ``active`` of its ``copies`` used per token."""

    name: str
    d_in: int
    d_out: int
    active: int = 1  # routed experts a token passes through (top-k); 1 for dense weights
    copies: int = 1  # copies stored (experts); params_total counts them all
    # The layer's last matmul whose output nothing saves for backward: torch's non-reentrant
    # checkpoint (early stop, the default) does not recompute it.
    tail: bool = False
    adaptable: bool = True  # a LoRA target under "all-linear" (routers are not)

    @property
    def active_params(self) -> int:
        return self.d_in * self.d_out * self.active

    @property
    def stored_params(self) -> int:
        return self.d_in * self.d_out * self.copies


@dataclass(frozen=True)
class LayerGroup:
    """``count`` identical transformer layers."""

    count: int
    projections: tuple[Projection, ...]

    @property
    def active_params(self) -> int:
        """Matmul parameters one token meets in one layer of this group."""
        return sum(p.active_params for p in self.projections)

    @property
    def tail_params(self) -> int:
        return sum(p.active_params for p in self.projections if p.tail)


_COUNT_ONLY = "params"  # the single pseudo-projection of a model known only by its size


@dataclass(frozen=True)
class ModelSpec:
    """What the estimator needs to know about a model, with where each number came from."""

    name: str
    groups: tuple[LayerGroup, ...]
    head_params: int  # LM head d×V (a matmul per token even when tied)
    attention_layers: int  # layers with a score/value (attention) term
    attention_dim: int  # query heads × head dim; 0 = no attention term
    params_total: int  # every stored parameter (embeddings, all experts, norms where known)
    architecture: str = ""
    experts: int | None = None
    experts_per_token: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    # The context length the config declares (max_position_embeddings and its aliases); the
    # estimator's default sequence length. None when the config has none.
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.head_params < 0 or self.attention_layers < 0 or self.attention_dim < 0:
            raise SpecError("head_params, attention_layers and attention_dim must be >= 0")
        if any(g.count < 0 for g in self.groups):
            raise SpecError("layer counts must be >= 0")
        if self.matmul_params <= 0:
            raise SpecError("a model needs a positive number of matmul parameters")

    @property
    def num_layers(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def layer_params(self) -> int:
        """Matmul parameters per token in all transformer layers (active experts only)."""
        return sum(g.count * g.active_params for g in self.groups)

    @property
    def tail_params(self) -> int:
        return sum(g.count * g.tail_params for g in self.groups)

    @property
    def matmul_params(self) -> int:
        """N in 6·N·D: matmul parameters one token meets, LM head included."""
        return self.layer_params + self.head_params

    @property
    def has_shapes(self) -> bool:
        """False for a model known only by its parameter count."""
        return not (len(self.groups) == 1 and self.groups[0].projections[0].name == _COUNT_ONLY
                    and len(self.groups[0].projections) == 1)

    def lora_params(self, rank: int, targets: Sequence[str] = ("all-linear",)) -> int:
        """Adapter parameters r·(d_in + d_out) per targeted matrix, as peft builds them."""
        if rank <= 0:
            raise SpecError(f"LoRA rank must be > 0, got {rank}")
        if not self.has_shapes:
            raise SpecError("a LoRA adapter's size cannot be derived from a bare parameter "
                            "count: give --adapter-params, or --config with the model's shapes")
        every = "all-linear" in targets
        total = 0
        for g in self.groups:
            for p in g.projections:
                short = p.name.rsplit(".", 1)[-1]
                if (every and p.adaptable) or p.name in targets or short in targets:
                    total += g.count * rank * (p.d_in + p.d_out) * p.active
        if total == 0:
            names = sorted({p.name for g in self.groups for p in g.projections})
            raise SpecError(f"no projection matches LoRA targets {list(targets)}; known: {names}")
        return total

    @classmethod
    def from_param_count(cls, params: int, *, num_layers: int | None = None,
                         attention_dim: int | None = None, name: str = "") -> ModelSpec:
        """A model known only by its parameter count N (treated as matmul parameters per token)."""
        if params <= 0:
            raise SpecError(f"parameter count must be > 0, got {params}")
        notes = [f"N = {params} given as a count: every parameter taken as a matmul weight "
                 "each token meets (embedding lookups over-counted, MoE inactive experts too)"]
        layers = num_layers or 0
        width = attention_dim or 0
        if not (layers and width):
            notes.append("attention term omitted: give the layer count and attention width")
        group = LayerGroup(1, (Projection(_COUNT_ONLY, params, 1, adaptable=False),))
        return cls(name=name or f"{params} parameters", groups=(group,), head_params=0,
                   attention_layers=layers if width else 0, attention_dim=width if layers else 0,
                   params_total=params, notes=tuple(notes))


# Model types whose MLP is two matrices (up, down) rather than a gated three (gate, up, down).
_PLAIN_MLP = frozenset({"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon",
                        "phi", "starcoder2", "bert", "roberta", "codegen", "mpt"})
# HF defaults of tie_word_embeddings where the config file leaves it out.
_TIED_BY_DEFAULT = frozenset({"gpt2", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "gemma",
                              "gemma2", "gemma3_text", "bert", "roberta", "mpt", "qwen2"})


def _int(cfg: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0 \
                or not math.isfinite(value) or int(value) != value:
            raise SpecError(f"config key {key!r} must be a positive integer, got {value!r}")
        return int(value)
    if default is None:
        raise SpecError(f"config has none of {', '.join(repr(k) for k in keys)}")
    return default


def _mlp(prefix: str, d: int, ff: int, gated: bool, *, active: int = 1, copies: int = 1,
         tail: bool = True) -> list[Projection]:
    mats = [Projection(f"{prefix}gate_proj", d, ff, active, copies)] if gated else []
    mats += [Projection(f"{prefix}up_proj", d, ff, active, copies),
             Projection(f"{prefix}down_proj", ff, d, active, copies, tail=tail)]
    return mats


def spec_from_hf_config(cfg: Mapping[str, Any], *, name: str = "") -> ModelSpec:
    """Build a spec from a Hugging Face ``config.json`` dict (decoder-only transformers)."""
    if not isinstance(cfg, Mapping):
        raise SpecError("config must be a JSON object")
    notes: list[str] = []
    if isinstance(cfg.get("text_config"), Mapping):
        notes.append("multimodal config: text_config used, vision tower not counted")
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type",
                                                                          cfg.get("model_type"))}
    if "kv_lora_rank" in cfg:
        raise SpecError("multi-head latent attention (kv_lora_rank) is not supported; "
                        "use a parameter count instead")
    mtype = str(cfg.get("model_type") or "")
    d = _int(cfg, "hidden_size", "n_embd", "d_model")
    n_layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(cfg, "num_attention_heads", "n_head")
    kv = _int(cfg, "num_key_value_heads", "num_kv_heads", default=heads)
    if heads % kv:
        raise SpecError(f"num_attention_heads {heads} is not a multiple of key/value heads {kv}")
    if "head_dim" not in cfg and d % heads:
        raise SpecError(f"hidden size {d} is not a multiple of {heads} heads; give head_dim")
    hd = _int(cfg, "head_dim", default=d // heads)
    vocab = _int(cfg, "vocab_size")
    ff = _int(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * d)
    gated = mtype not in _PLAIN_MLP
    if not mtype:
        notes.append("model_type missing: gated (SwiGLU) MLP assumed")
    tie_raw = cfg.get("tie_word_embeddings")
    tied = bool(tie_raw) if tie_raw is not None else mtype in _TIED_BY_DEFAULT
    if tie_raw is None:
        notes.append(f"tie_word_embeddings missing: {'tied' if tied else 'untied'} assumed")

    if mtype == "gpt2":
        attn = [Projection("c_attn", d, 3 * d), Projection("attn.c_proj", d, d)]
    else:
        attn = [Projection("q_proj", d, heads * hd), Projection("k_proj", d, kv * hd),
                Projection("v_proj", d, kv * hd), Projection("o_proj", heads * hd, d)]

    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    top_k = cfg.get("num_experts_per_tok")
    groups: list[LayerGroup] = []
    if experts:
        e = _int(cfg, "num_local_experts", "num_experts", "n_routed_experts")
        k = _int(cfg, "num_experts_per_tok")
        if k > e:
            raise SpecError(f"num_experts_per_tok {k} exceeds the {e} experts")
        eff = _int(cfg, "moe_intermediate_size", "intermediate_size")
        # The router's weighting multiplies each expert's output, so that output is saved and
        # a non-reentrant checkpoint does recompute the expert down projections: no tail.
        moe = [Projection("router", d, e, adaptable=False),
               *_mlp("experts.", d, eff, gated, active=k, copies=e, tail=False)]
        shared_ff = cfg.get("shared_expert_intermediate_size")
        n_shared = cfg.get("n_shared_experts")
        if shared_ff:
            moe += [*_mlp("shared_expert.", d, _int(cfg, "shared_expert_intermediate_size"),
                          gated, tail=False),
                    Projection("shared_expert_gate", d, 1, adaptable=False)]
        elif n_shared:
            moe += _mlp("shared_experts.", d, eff * _int(cfg, "n_shared_experts"), gated,
                        tail=False)
        dense_first = int(cfg.get("first_k_dense_replace") or 0)
        sparse_step = int(cfg.get("decoder_sparse_step") or 1)
        dense_layers = list(cfg.get("mlp_only_layers") or [])
        n_dense = sum(1 for i in range(n_layers)
                      if i < dense_first or i in dense_layers or (i + 1) % sparse_step)
        if n_dense:
            groups.append(LayerGroup(n_dense, (*attn, *_mlp("", d, ff, gated))))
        groups.append(LayerGroup(n_layers - n_dense, (*attn, *moe)))
        notes.append(f"mixture of experts: {k} of {e} experts active per token")
    else:
        if top_k:
            notes.append("num_experts_per_tok without an expert count: dense model assumed")
        mlp = ([Projection("c_fc", d, ff), Projection("mlp.c_proj", ff, d, tail=True)]
               if mtype == "gpt2" else _mlp("", d, ff, gated))
        groups.append(LayerGroup(n_layers, (*attn, *mlp)))

    layer_stored = sum(g.count * sum(p.stored_params for p in g.projections) for g in groups)
    positions = _int(cfg, "n_positions", default=1) if mtype == "gpt2" else 0
    norms = (2 * n_layers + 1) * d  # weights only; biases and norm shapes vary by family
    params_total = layer_stored + vocab * d * (1 if tied else 2) + positions * d + norms
    notes.append("params_total from shapes (norm weights included, biases not)")
    return ModelSpec(name=name or str(cfg.get("_name_or_path") or mtype or "hf-config"),
                     groups=tuple(groups), head_params=d * vocab, attention_layers=n_layers,
                     attention_dim=heads * hd, params_total=params_total,
                     architecture=mtype or "unknown",
                     experts=int(experts) if experts else None,
                     experts_per_token=int(top_k) if experts and top_k else None,
                     notes=tuple(notes),
                     max_seq_len=_int(cfg, "max_position_embeddings", "n_positions",
                                      "seq_length", "max_sequence_length", default=0) or None)


def load_hf_config(path: Path) -> ModelSpec:
    """Read a ``config.json`` file (or a folder holding one) into a spec."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"{path}: {exc}") from exc
    label = data.get("_name_or_path") if isinstance(data, dict) else None
    try:
        return spec_from_hf_config(data, name=str(label or path.parent.name))
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from exc
