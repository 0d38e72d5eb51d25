"""gpuflops: meters the floating-point operations GPUs execute, per process and per job."""

__version__ = "0.1.0"
