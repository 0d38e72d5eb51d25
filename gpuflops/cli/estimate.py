"""``gpuflops estimate``: plan a fine-tuning run's FLOPs against the EU AI Act thresholds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from gpuflops.estimate import (
    AttentionKernel,
    Estimate,
    Method,
    ModelSpec,
    SpecError,
    causal_fraction,
    estimate,
    load_hf_config,
    threshold_checks,
)


def _plan(spec: ModelSpec, method: Method, tokens: int, seq_len: int, adapter: int | None,
          lora_rank: int, lora_targets: tuple[str, ...], **kw: Any) -> Estimate:
    if method is Method.FULL:
        return estimate(spec, tokens, seq_len=seq_len, method=method, **kw)
    if adapter is None:
        adapter = spec.lora_params(lora_rank, lora_targets)
    return estimate(spec, tokens, seq_len=seq_len, method=method, adapter_params=adapter, **kw)


@click.command("estimate")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="Hugging Face config.json (or the folder holding it).")
@click.option("--params", type=float, help="Parameter count N, when there is no config.")
@click.option("--layers", type=int, help="With --params: layers, for the attention term.")
@click.option("--attention-dim", type=int, help="With --params: heads × head dim.")
@click.option("--tokens", type=float, help="Real (non-padding) training tokens in all.")
@click.option("--steps", type=int, help="Optimizer steps (instead of --tokens).")
@click.option("--micro-batch-size", type=int, default=1, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--data-parallel", type=int, default=1, show_default=True)
@click.option("--real-token-fraction", type=float, default=1.0, show_default=True,
              help="Share of sequence positions that are real tokens (padding excluded).")
@click.option("--seq-len", type=int, default=None,
              help="Sequence length [the config's max_position_embeddings].")
@click.option("--method", "methods", multiple=True,
              type=click.Choice(["full", "lora", "qlora", "all"]), default=("all",),
              show_default=True)
@click.option("--lora-rank", type=int, default=16, show_default=True)
@click.option("--lora-targets", default="all-linear", show_default=True,
              help="Comma-separated projection names (q_proj,v_proj) or all-linear.")
@click.option("--adapter-params", type=float, help="Adapter parameters (overrides rank).")
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=False)
@click.option("--reentrant-checkpoint", is_flag=True,
              help="Checkpointing reruns whole layers (use_reentrant=True).")
@click.option("--causal-kernel", is_flag=True,
              help="Attention kernel skips masked blocks: count (s+1)/(2s) of the scores.")
@click.option("--attention-kernel", type=click.Choice([k.value for k in AttentionKernel]),
              default=AttentionKernel.FUSED.value, show_default=True)
@click.option("--base-compute", type=float, help="Base model's training compute C, FLOPs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def estimate_command(config_path: Path | None, params: float | None, layers: int | None,
                     attention_dim: int | None, tokens: float | None, steps: int | None,
                     micro_batch_size: int, grad_accum: int, data_parallel: int,
                     real_token_fraction: float, seq_len: int | None, methods: tuple[str, ...],
                     lora_rank: int, lora_targets: str, adapter_params: float | None,
                     activation_checkpointing: bool, reentrant_checkpoint: bool,
                     causal_kernel: bool, attention_kernel: str, base_compute: float | None,
                     as_json: bool) -> None:
    """Estimate a fine-tuning run's FLOPs per method before it starts."""
    if (config_path is None) == (params is None):
        raise click.UsageError("give exactly one of --config and --params")
    if (tokens is None) == (steps is None):
        raise click.UsageError("give exactly one of --tokens and --steps")
    if not 0 < real_token_fraction <= 1:
        raise click.BadParameter("must be in (0, 1]", param_hint="--real-token-fraction")
    if base_compute is not None and not (math.isfinite(base_compute) and base_compute > 0):
        raise click.BadParameter("must be > 0", param_hint="--base-compute")
    try:
        if config_path is not None:
            spec = load_hf_config(config_path)
        else:
            assert params is not None
            spec = ModelSpec.from_param_count(round(params), num_layers=layers,
                                              attention_dim=attention_dim)
        seq_source = "--seq-len"
        if seq_len is None:
            seq_source = "the config's max_position_embeddings"
            if spec.max_seq_len is None:
                raise click.UsageError("give --seq-len: the model config declares no "
                                       "max_position_embeddings" if config_path else
                                       "give --seq-len (or --config, whose context length is "
                                       "the default)")
            seq_len = spec.max_seq_len
        if min(micro_batch_size, grad_accum, data_parallel, seq_len) < 1:
            raise click.UsageError("batch sizes, --grad-accum, --data-parallel, --seq-len: >= 1")
        if tokens is None:
            assert steps is not None
            if steps < 0:
                raise SpecError("--steps must be >= 0")
            tokens = steps * micro_batch_size * grad_accum * data_parallel * seq_len \
                * real_token_fraction
        if not (math.isfinite(tokens) and tokens >= 0):
            raise SpecError("--tokens must be >= 0")
        chosen = [Method.FULL, Method.LORA, Method.QLORA] if "all" in methods \
            else [Method(m) for m in dict.fromkeys(methods)]
        skipped = []
        if "all" in methods and not spec.has_shapes and adapter_params is None:
            # LoRA's adapter size needs the model's shapes; plan what can be planned.
            skipped = ["lora", "qlora"]
            chosen = [Method.FULL]
        targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
        results = {m.value: _plan(
            spec, m, round(tokens), seq_len,
            None if adapter_params is None else round(adapter_params), lora_rank, targets,
            activation_checkpointing=activation_checkpointing,
            checkpoint_early_stop=not reentrant_checkpoint,
            attention_fraction=causal_fraction(seq_len) if causal_kernel else 1.0,
            attention_kernel=attention_kernel, micro_batches=grad_accum) for m in chosen}
    except SpecError as exc:
        raise click.ClickException(str(exc)) from exc

    report = {
        "model": {"name": spec.name, "architecture": spec.architecture,
                  "params_total": spec.params_total, "matmul_params": spec.matmul_params,
                  "layers": spec.num_layers, "attention_dim": spec.attention_dim,
                  "experts": spec.experts, "experts_per_token": spec.experts_per_token},
        "tokens": round(tokens),
        "seq_len": seq_len,
        "seq_len_source": seq_source,
        "estimates": {
            name: {**e.to_dict(), "thresholds": [
                {"rule": c.rule, "description": c.description,
                 "threshold_flops": c.threshold_flops, "ratio": c.ratio,
                 "exceeded": c.exceeded}
                for c in threshold_checks(e.total, base_compute)]}
            for name, e in results.items()},
        "not_planned": {m: "adapter size unknown from a parameter count: give --adapter-params "
                           "or --config" for m in skipped},
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"model {spec.name}: {spec.params_total:,} parameters, N = "
               f"{spec.matmul_params:,} matmul parameters per token; D = {round(tokens):,} tokens; "
               f"sequence length {seq_len} (from {seq_source})")
    for name, e in results.items():
        click.echo(f"\n{name}: total {e.total:.3e} FLOPs "
                   f"(forward {e.forward:.3e}, activation grads {e.backward:.3e}, weight grads "
                   f"{e.weight_grads:.3e}, attention {e.attention:.3e}, recompute "
                   f"{e.recompute:.3e}; without recompute {e.total_excluding_recompute:.3e})")
        for c in threshold_checks(e.total, base_compute):
            mark = "EXCEEDS" if c.exceeded else "below"
            click.echo(f"  {mark:7} {c.description}: {c.threshold_flops:.3e} "
                       f"({c.ratio:.2%})")
    for m in skipped:
        click.echo(f"\n{m}: not planned: the adapter size cannot be derived from a parameter "
                   "count; give --adapter-params or --config")
    click.echo("\nassumptions:")
    for line in next(iter(results.values())).assumptions:
        click.echo(f"  - {line}")
