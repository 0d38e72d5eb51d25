"""Job socket: the protocol, the daemon-side server and the job registry."""

from gpuflops.jobs.registry import (
    JobEvent,
    JobRef,
    JobRegistry,
    JobSnapshot,
    Peer,
    ProcessLookup,
    PsutilProcessLookup,
    RegistryLimits,
    RegistrySnapshot,
)
from gpuflops.jobs.server import (
    DEFAULT_SOCKET_PATH,
    JobSocketServer,
    ServerLimits,
    ServerStats,
    SocketInUseError,
)

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "JobEvent",
    "JobRef",
    "JobRegistry",
    "JobSnapshot",
    "JobSocketServer",
    "Peer",
    "ProcessLookup",
    "PsutilProcessLookup",
    "RegistryLimits",
    "RegistrySnapshot",
    "ServerLimits",
    "ServerStats",
    "SocketInUseError",
]
