"""Client library for training code: report a job's analytic FLOPs and tokens to the daemon."""

from gpuflops.client.reporter import JobReporter, ReporterStats
from gpuflops.config import DEFAULT_SOCKET_PATH

__all__ = ["DEFAULT_SOCKET_PATH", "JobReporter", "ReporterStats"]
