"""Lightning callback against torch's flop counter on the same training batches (CPU)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

from gpuflops.client.lightning import GpuflopsLightningCallback  # noqa: E402
from gpuflops.estimate.exact import FlopCount  # noqa: E402

SEQ, VOCAB = 32, 256
# Lightning 2.6 warns about its own use of torch's pytree API and about CPU/worker settings.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


class RecordingReporter:
    def __init__(self) -> None:
        self.adds: list[tuple[float, float, float]] = []
        self.closed = 0

    def add(self, flops: float, tokens: float = 0.0, recompute_flops: float = 0.0) -> None:
        self.adds.append((flops, tokens, recompute_flops))

    def close(self) -> None:
        self.closed += 1


class MeasureBatches(pl.Callback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.totals: list[float] = []
        self._counter: FlopCount | None = None

    def on_train_batch_start(self, *args: Any) -> None:
        self._counter = FlopCount()
        self._counter.__enter__()

    def on_train_batch_end(self, *args: Any) -> None:
        assert self._counter is not None
        self._counter.__exit__(None, None, None)
        assert self._counter.result is not None
        self.totals.append(self._counter.result.total)


class TinyLM(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, checkpointing: bool) -> None:
        super().__init__()
        cfg = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_config(cfg)
        if checkpointing:
            self.model.activation_checkpointing_enable()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def loader() -> Any:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (8, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, 20:] = 0  # every other row has 20 real tokens
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i]}
            for i in range(8)]
    return torch.utils.data.DataLoader(rows, batch_size=2)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_batches_match_flop_counter(checkpointing: bool) -> None:
    reporter, measure = RecordingReporter(), MeasureBatches()
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[GpuflopsLightningCallback(reporter), measure])
    trainer.fit(TinyLM(checkpointing), loader())
    assert len(reporter.adds) == len(measure.totals) == 4  # 2 steps × 2 micro-batches
    assert [t for _, t, _ in reporter.adds] == [SEQ + 20] * 4  # real tokens only
    # Padded positions still run through the matmuls, which the counter sees and the
    # estimate leaves out: real tokens are 52 of 64.
    for (flops, _, _), measured in zip(reporter.adds, measure.totals, strict=True):
        assert flops < measured
    assert reporter.closed == 1
    # SDPA's fused backward recomputes the scores, 0.5× the attention forward (4·s·d_attn per
    # token and layer), with s = Σlen²/Σlen; checkpointing adds at least the attention forward.
    scores = 0.5 * 4 * (SEQ**2 + 20**2) * 64 * 2
    for _, _, r in reporter.adds:
        assert r > 3 * scores if checkpointing else r == pytest.approx(scores, rel=1e-12)


def test_unpadded_batches_match_within_two_percent() -> None:
    reporter, measure = RecordingReporter(), MeasureBatches()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (8, SEQ), generator=g)
    rows = [{"input_ids": ids[i], "labels": ids[i]} for i in range(8)]
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[GpuflopsLightningCallback(reporter), measure])
    trainer.fit(TinyLM(True), torch.utils.data.DataLoader(rows, batch_size=2))
    assert len(reporter.adds) == 4
    for (flops, tokens, _), measured in zip(reporter.adds, measure.totals, strict=True):
        assert tokens == 2 * SEQ
        assert flops == pytest.approx(measured, rel=0.02)
