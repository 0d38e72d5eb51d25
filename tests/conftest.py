"""Fixtures every test folder shares: the demo trace, a fake clock, fake GPUs, and a real job
socket server on a short path under /tmp (Unix socket paths must stay under 108 bytes)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpuflops.jobs.registry import JobRegistry
from gpuflops.jobs.server import JobSocketServer, ServerLimits
from gpuflops.model import GpuInfo
from tests.jobs.jobsock_client import Client
from tests.support import DEMO_TRACE, DemoTrace, FakeClock, demo_trace, fake_gpus, short_tmpdir


@pytest.fixture
def demo_path() -> Path:
    """The H100 demo trace shipped in the package."""
    return DEMO_TRACE


@pytest.fixture
def demo() -> DemoTrace:
    """The demo trace's header, intervals and events."""
    return demo_trace()


@pytest.fixture
def demo_gpu(demo: DemoTrace) -> GpuInfo:
    """The one H100 the demo trace recorded."""
    return demo[0].gpus[0]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gpus() -> list[GpuInfo]:
    """Two fake H100s."""
    return fake_gpus()


@pytest.fixture
def tmpdir_short() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="gf")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def registry() -> JobRegistry:
    return JobRegistry()


@pytest.fixture
def server(registry: JobRegistry, tmpdir_short: str) -> Iterator[JobSocketServer]:
    srv = JobSocketServer(registry, f"{tmpdir_short}/s.sock", limits=ServerLimits())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: JobSocketServer) -> Iterator[Client]:
    c = Client(str(server.path))
    yield c
    c.close()


@pytest.fixture
def connect(server: JobSocketServer) -> Iterator[Callable[[], Client]]:
    made: list[Client] = []

    def factory() -> Client:
        made.append(Client(str(server.path)))
        return made[-1]

    yield factory
    for c in made:
        c.close()


# A real PostgreSQL for the central store's tests (tests/pgserver.py).
from tests.central_fixtures import central, central_tls, pg, pg_tls, tls  # noqa: E402, F401


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A temporary directory short enough for Unix socket paths."""
    with short_tmpdir() as d:
        yield d
