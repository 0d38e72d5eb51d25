"""Fixtures: a real job socket server on a short path under /tmp."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest

from gpuflops.jobs.registry import JobRegistry
from gpuflops.jobs.server import JobSocketServer, ServerLimits
from tests.jobs.jobsock_client import Client


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
from tests.central_fixtures import central, pg  # noqa: E402, F401
