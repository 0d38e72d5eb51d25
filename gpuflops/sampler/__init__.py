"""Sampler backends: each turns one GPU interval into a :class:`gpuflops.model.GpuSample`."""
