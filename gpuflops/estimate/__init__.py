"""Analytic estimator: FLOPs a fine-tuning run needs, term by term (no torch needed).

``gpuflops.estimate.exact`` (imports torch) counts real steps with torch's flop counter;
``gpuflops.estimate.torchmodel`` reads a live torch model and its batches for the callbacks.
"""

from gpuflops.estimate.formulas import (
    DEFAULT_ATTENTION_FRACTION,
    AttentionKernel,
    Estimate,
    Method,
    causal_fraction,
    effective_seq_len,
    estimate,
)
from gpuflops.estimate.plan import ThresholdCheck, threshold_checks
from gpuflops.estimate.spec import (
    LayerGroup,
    ModelSpec,
    Projection,
    SpecError,
    load_hf_config,
    spec_from_hf_config,
)

__all__ = [
    "DEFAULT_ATTENTION_FRACTION",
    "AttentionKernel",
    "Estimate",
    "LayerGroup",
    "Method",
    "ModelSpec",
    "Projection",
    "SpecError",
    "ThresholdCheck",
    "causal_fraction",
    "effective_seq_len",
    "estimate",
    "load_hf_config",
    "spec_from_hf_config",
    "threshold_checks",
]
