"""DCGM backend: profiling fields and the SM clock from a DCGM host engine."""

from gpuflops.sampler.dcgm.sampler import *  # noqa: F403 (temporary during the move)
