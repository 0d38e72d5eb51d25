"""GPU check of the HF callback: analytic per-step FLOPs vs torch's flop counter, same steps.

Builds a ~200M-parameter Llama-style model from a config (no downloads), trains it in bf16 at
sequence length 1024 with the HF Trainer for about ``--seconds``, publishes every step through
a real ``JobReporter`` to the daemon socket ``--socket``, counts every step with
FlopCounterMode, and writes analytic and counted totals and their ratio to ``--out``.
Fails (non-zero exit, traceback) on any error, including nothing delivered to the daemon.

    python benchmarks/hf_callback_gpu.py --socket /run/gpuflops/gpuflops.sock --out hf.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from gpuflops.client.hf import GpuflopsCallback
from gpuflops.client.reporter import JobReporter
from gpuflops.estimate.exact import FlopCount

SEQ = 1024
VOCAB = 32000


class StepCounter(transformers.TrainerCallback):
    """Counts each optimizer step with FlopCounterMode; stops training after the time budget."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.totals: list[float] = []
        self.step_s: list[float] = []
        self._counter: FlopCount | None = None
        self._t0 = self._step_t0 = 0.0

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self._t0 = time.monotonic()

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        torch.cuda.synchronize()
        self._step_t0 = time.monotonic()
        self._counter = FlopCount()
        self._counter.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        assert self._counter is not None, "step ended without beginning"
        self._counter.__exit__(None, None, None)
        assert self._counter.result is not None
        self.totals.append(self._counter.result.total)
        torch.cuda.synchronize()
        self.step_s.append(time.monotonic() - self._step_t0)
        if time.monotonic() - self._t0 > self.seconds:
            control.should_training_stop = True
        return control


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.ids[i]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, help="gpuflops daemon job socket")
    ap.add_argument("--out", required=True, type=Path, help="JSON result file")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=8, help="per-device micro-batch")
    ap.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--job", default=f"hf-callback-bench-{os.getpid()}")
    ap.add_argument("--program", default="benchmarks")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    if not Path(a.socket).exists():
        raise SystemExit(f"daemon socket {a.socket} does not exist")

    cfg = transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
        # no GQA: torch 2.11's FlopCounterMode rejects SDPA with fewer KV heads than heads
        num_key_value_heads=16, vocab_size=VOCAB, max_position_embeddings=SEQ,
        tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).cuda()
    params = sum(p.numel() for p in model.parameters())

    reporter = JobReporter(a.job, a.program, socket_path=a.socket, model="bench-llama-200m",
                           params=params, precision="bf16", method="full", seq_len=SEQ)
    callback = GpuflopsCallback(reporter)
    counter = StepCounter(a.seconds)
    with tempfile.TemporaryDirectory() as out_dir:
        # transformers renamed gradient_checkpointing to activation_checkpointing in 5.2x
        fields = transformers.TrainingArguments.__dataclass_fields__
        ck = ("activation_checkpointing" if "activation_checkpointing" in fields
              else "gradient_checkpointing")
        args = transformers.TrainingArguments(
            output_dir=out_dir, max_steps=100_000, per_device_train_batch_size=a.batch,
            gradient_accumulation_steps=a.accum, learning_rate=1e-4, bf16=True, report_to=[],
            save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=2, **{ck: a.checkpointing})
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=RandomTokens(a.batch * a.accum * 2000),
            callbacks=[callback, counter])
        t0 = time.monotonic()
        trainer.train()
        wall_s = time.monotonic() - t0
    stats = reporter.close()  # the callback already closed it; this returns the final stats

    analytic = [s.flops for s in callback.steps]
    if len(analytic) != len(counter.totals) or not analytic:
        raise SystemExit(f"step mismatch: {len(analytic)} analytic vs {len(counter.totals)} "
                         "counted (callback.steps keeps the last 1024 steps)")
    a_total, c_total = sum(analytic), sum(counter.totals)
    if stats.delivered_adds != len(analytic) or stats.dropped_adds:
        raise SystemExit(f"reporter did not deliver every step: {stats}")
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "params_total": params, "seq_len": SEQ, "micro_batch": a.batch, "accum": a.accum,
        "activation_checkpointing": a.checkpointing, "steps": len(analytic),
        "wall_s": wall_s, "median_step_s": sorted(counter.step_s)[len(counter.step_s) // 2],
        "tokens": sum(s.tokens for s in callback.steps),
        "analytic_flops": a_total, "flop_counter_flops": c_total,
        "ratio_analytic_over_counter": a_total / c_total,
        "max_step_deviation": max(abs(x / y - 1) for x, y in zip(analytic, counter.totals,
                                                                   strict=True)),
        "delivered_flops": stats.delivered_flops, "delivered_tokens": stats.delivered_tokens,
        "assumptions": list(callback.facts.estimate(SEQ, SEQ).assumptions
                            if callback.facts else []),
    }
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("steps", "analytic_flops", "flop_counter_flops",
                                             "ratio_analytic_over_counter")}))
    if abs(result["ratio_analytic_over_counter"] - 1) > 0.02:
        print("analytic and counted FLOPs differ by more than 2%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
