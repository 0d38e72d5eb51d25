"""HF Trainer callback against torch's flop counter on the very same steps (CPU, tiny models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gpuflops.client.hf import GpuflopsCallback  # noqa: E402
from gpuflops.estimate.exact import FlopCount  # noqa: E402
from gpuflops.estimate.torchmodel import inspect_model  # noqa: E402

SEQ = 32
VOCAB = 256


class RecordingReporter:
    """Stands in for JobReporter: records what the callback publishes."""

    def __init__(self) -> None:
        self.adds: list[tuple[float, float, float]] = []
        self.claims: list[tuple[str, float]] = []
        self.started = 0
        self.closed = 0

    def start(self) -> None:
        self.started += 1

    def add(self, flops: float, tokens: float = 0.0, recompute_flops: float = 0.0) -> None:
        self.adds.append((flops, tokens, recompute_flops))

    def claim(self, kind: str, value: float, *, sampled_steps: int,
              evidence: str | None = None) -> None:
        self.claims.append((kind, value))

    def close(self) -> None:
        self.closed += 1


class MeasureSteps(transformers.TrainerCallback):  # type: ignore[misc]
    """Counts each optimizer step's FLOPs exactly, from step begin to step end."""

    def __init__(self) -> None:
        self.totals: list[float] = []
        self._counter: FlopCount | None = None

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._counter = FlopCount()
        self._counter.__enter__()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        assert self._counter is not None
        self._counter.__exit__(None, None, None)
        assert self._counter.result is not None
        self.totals.append(self._counter.result.total)


class Tokens(torch.utils.data.Dataset):  # type: ignore[misc]
    def __init__(self, n: int, pad_every: int = 0) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.mask = torch.ones(n, SEQ, dtype=torch.long)
        if pad_every:  # right-pad some rows: real lengths 32, 20, 8, ...
            for i in range(n):
                self.mask[i, SEQ - (i % pad_every) * 12:] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.ids[i].masked_fill(self.mask[i] == 0, -100)}


def tiny_llama(attn: str = "eager") -> Any:
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        tie_word_embeddings=False)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def train(tmp_path: Path, model: Any, data: Any, *, steps: int = 3, accum: int = 2,
          checkpointing: bool = False) -> tuple[RecordingReporter, MeasureSteps]:
    reporter, measure = RecordingReporter(), MeasureSteps()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=accum, learning_rate=1e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
        activation_checkpointing=checkpointing, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[GpuflopsCallback(reporter), measure])
    trainer.train()
    return reporter, measure


def assert_steps_match(reporter: RecordingReporter, measure: MeasureSteps, steps: int) -> None:
    assert len(reporter.adds) == len(measure.totals) == steps
    for (flops, _tokens, _recompute), measured in zip(reporter.adds, measure.totals, strict=True):
        assert flops == pytest.approx(measured, rel=0.02)


def test_full_finetune_steps_match_flop_counter(tmp_path: Path) -> None:
    reporter, measure = train(tmp_path, tiny_llama(), Tokens(16))
    assert_steps_match(reporter, measure, 3)
    assert [t for _, t, _ in reporter.adds] == [2 * 2 * SEQ] * 3  # 2 micro-batches of 2 rows
    assert all(r == 0 for _, _, r in reporter.adds)
    assert (reporter.started, reporter.closed) == (1, 1)


def test_checkpointing_and_fused_attention_match(tmp_path: Path) -> None:
    reporter, measure = train(tmp_path, tiny_llama("sdpa"), Tokens(16), checkpointing=True)
    assert_steps_match(reporter, measure, 3)
    assert all(r > 0 for _, _, r in reporter.adds)


def test_padding_is_not_counted(tmp_path: Path) -> None:
    data = Tokens(12, pad_every=3)
    reporter, _ = train(tmp_path, tiny_llama(), data, steps=3, accum=2)
    real = [int(data.mask[i].sum()) for i in range(12)]
    assert sum(t for _, t, _ in reporter.adds) == sum(real)


# peft 0.21 reads transformers' deprecated is_gradient_checkpointing alias.
peft_warnings = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")


def lora_llama(targets: Any) -> Any:
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=8, target_modules=targets, lora_dropout=0.0)
    return peft.get_peft_model(tiny_llama(), cfg)


@peft_warnings
def test_lora_with_checkpointing_matches(tmp_path: Path) -> None:
    model = lora_llama("all-linear")
    reporter, measure = train(tmp_path, model, Tokens(8), steps=2, checkpointing=True)
    assert_steps_match(reporter, measure, 2)
    facts = inspect_model(model)
    assert facts.method.value == "lora"
    assert facts.adapter_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


@peft_warnings
@peft_warnings
def test_lora_without_checkpointing_overestimates_slightly(tmp_path: Path) -> None:
    # Without checkpointing nothing before layer 0's adapters needs a gradient, so autograd
    # skips the input gradients of layer 0's q/k/v; the analytic 4·N keeps them (upper bound).
    reporter, measure = train(tmp_path, lora_llama(["q_proj", "v_proj"]), Tokens(8), steps=2)
    for (flops, _, _), measured in zip(reporter.adds, measure.totals, strict=True):
        assert measured < flops < measured * 1.05


@pytest.mark.parametrize(("flags", "declared"), [({"bf16": True}, "bf16"), ({}, "fp32")])
def test_declares_the_precision_the_matrix_products_run_at(tmp_path: Path, flags: dict,
                                                           declared: str) -> None:
    # bf16 autocast keeps fp32 parameters: reading their dtype alone said "fp32", and the
    # daemon then counted tensor work at the wrong rate.
    callback = GpuflopsCallback(RecordingReporter())
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, **flags)
    transformers.Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(4),
                         callbacks=[callback]).train()
    assert callback.metadata["precision"] == declared


def test_half_rate_claim_divides_by_the_step_total_once() -> None:
    from gpuflops.client.census import Census
    from gpuflops.client.estimating import StepTally

    # A step's flops are the estimates' totals, recomputation included: adding the
    # recomputation again (every fused-attention step has some) understated the share.
    reporter = RecordingReporter()
    callback = GpuflopsCallback(reporter)
    callback.facts = inspect_model(tiny_llama("sdpa"))
    step = StepTally()
    step.add(callback.facts, 2 * SEQ, SEQ, 1.0)
    assert step.recompute > 0
    callback.steps.append(step)
    callback._claim(Census(matmul_flops=step.flops, half_rate_flops=step.flops / 4,
                           linked_ops=1))
    assert reporter.claims == [("half_rate_tensor_fraction", pytest.approx(0.25))]
