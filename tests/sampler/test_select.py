"""select_backend: GPM, else DCGM profiling, else NVML without tensor activity; never a replay."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpuflops.sampler.base import Sampler, SamplerError
from gpuflops.sampler.dcgm.sampler import DcgmSampler
from gpuflops.sampler.nvml import NvmlSampler
from gpuflops.sampler.select import select_backend
from tests.support import DEMO_TRACE, FakeClock

HERE = Path(__file__).parent
FAKE_DIR = HERE / "fake_dcgm"
TRACE = DEMO_TRACE
sys.path.insert(0, str(FAKE_DIR))
sys.path.insert(0, str(HERE))

import dcgm_fake_engine as fe  # noqa: E402
import dcgm_structs as ds  # noqa: E402
import fake_nvml  # noqa: E402


@dataclass
class Settings:
    backend: str = "auto"


@pytest.fixture
def node() -> Iterator[tuple[FakeClock, fe.FakeHostEngine]]:
    timeline, _ = fe.timeline_from_trace(TRACE)
    clock = FakeClock(timeline.rows[0][0])
    engine = fe.FakeHostEngine([fe.FakeGpu(0, "NVIDIA H100 80GB HBM3", "GPU-x", "hopper", timeline)], clock)
    fe.install(engine)
    yield clock, engine
    fe.install(None)


def _factories(clock: FakeClock, gpm: bool, nvml_ok: bool = True):  # type: ignore[no-untyped-def]
    built: list[Sampler] = []

    def nvml() -> Sampler:
        fake, gpus = fake_nvml.from_trace(TRACE, clock, clock.t)
        gpus[0].gpm_supported = gpm
        if not nvml_ok:
            fake.init_error = fake.NVML_ERROR_DRIVER_NOT_LOADED
        s = NvmlSampler(nvml=fake, clock=clock, sleep=clock.sleep, stop=threading.Event())  # type: ignore[arg-type]
        built.append(s)
        return s

    def dcgm() -> Sampler:
        s = DcgmSampler(bindings_paths=[FAKE_DIR], clock=clock, sleep=clock.sleep)
        built.append(s)
        return s

    return nvml, dcgm, built


def test_auto_prefers_gpm(
    node: tuple[FakeClock, fe.FakeHostEngine], caplog: pytest.LogCaptureFixture
) -> None:
    nvml, dcgm, built = _factories(node[0], gpm=True)
    with caplog.at_level(logging.INFO):
        s = select_backend(Settings(), nvml=nvml, dcgm=dcgm)
    assert s.name == "nvml" and len(built) == 1
    assert any("chose nvml (GPM" in m for m in caplog.messages)


def test_auto_falls_back_to_dcgm_when_gpm_is_missing(
    node: tuple[FakeClock, fe.FakeHostEngine], caplog: pytest.LogCaptureFixture
) -> None:
    nvml, dcgm, built = _factories(node[0], gpm=False)
    with caplog.at_level(logging.INFO):
        s = select_backend(Settings(), nvml=nvml, dcgm=dcgm)
    assert s.name == "dcgm" and s.gpus()[0].metrics
    assert any("chose dcgm" in m and "GPM not supported" in m for m in caplog.messages)
    assert built[0]._closed  # type: ignore[attr-defined]
    s.close()


def test_auto_says_plainly_when_nothing_measures_tensor_activity(
    node: tuple[FakeClock, fe.FakeHostEngine], caplog: pytest.LogCaptureFixture
) -> None:
    node[1].gpus[0].prof_error = ds.DCGM_ST_PROFILING_NOT_SUPPORTED
    nvml, dcgm, built = _factories(node[0], gpm=False)
    with caplog.at_level(logging.WARNING):
        s = select_backend(Settings(), nvml=nvml, dcgm=dcgm)
    assert s.name == "nvml" and not s.gpus()[0].metrics
    assert any("WITHOUT tensor activity" in m and "profiling" in m for m in caplog.messages)
    assert built[1]._closed  # type: ignore[attr-defined]


def test_auto_without_dcgm_bindings_and_without_driver_raises(
    node: tuple[FakeClock, fe.FakeHostEngine],
) -> None:
    fe.install(None)  # no libdcgm
    nvml, dcgm, _ = _factories(node[0], gpm=False, nvml_ok=False)
    with pytest.raises(SamplerError, match="no backend can sample this node") as e:
        select_backend(Settings(), nvml=nvml, dcgm=dcgm)
    assert "nvml:" in str(e.value) and "dcgm:" in str(e.value)
    with pytest.raises(SamplerError, match="not 'replay'"):
        select_backend(Settings("replay"), nvml=nvml, dcgm=dcgm)


def test_explicit_backend_is_built_as_asked(node: tuple[FakeClock, fe.FakeHostEngine]) -> None:
    nvml, dcgm, _ = _factories(node[0], gpm=True)
    s = select_backend(Settings("dcgm"), nvml=nvml, dcgm=dcgm)
    assert s.name == "dcgm"
    s.close()
