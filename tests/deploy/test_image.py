"""The Containerfile builds the image the chart names, with buildah, from a debootstrap base.

No container registry is used: the base is Debian 12 made by debootstrap from Debian's
packages, gpuflops and its dependencies go in as wheels made here, and the image then runs the
demo daemon. buildah and debootstrap are Debian packages (.ci/run installs them); locally the
test skips without them, in CI it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gpuflops import __version__
from tests.deploy.tooling import REPO, require_tool

ENV = {**os.environ, "STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}


def _run(*args: str, timeout: float = 600, cwd: Path | None = None) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(args)}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture
def made() -> Iterator[list[str]]:
    """Images and containers the test made; removed afterwards, and nothing else."""
    names: list[str] = []
    yield names
    for name in reversed(names):
        subprocess.run(["buildah", "rm", name], capture_output=True, env=ENV)
        subprocess.run(["buildah", "rmi", "-f", name], capture_output=True, env=ENV)


def test_the_chart_names_the_version_the_image_installs() -> None:
    chart = yaml.safe_load((REPO / "helm" / "gpuflops" / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__  # image.tag defaults to appVersion
    text = (REPO / "Containerfile").read_text()
    assert 'ENTRYPOINT ["/opt/gpuflops/bin/gpuflops"]' in text  # the chart's args start at daemon


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_containerfile_builds_and_runs_the_daemon(tmp_path: Path, made: list[str]) -> None:
    buildah = require_tool("buildah", "buildah")
    debootstrap = require_tool("debootstrap", "debootstrap")
    if os.geteuid() != 0:
        pytest.skip("debootstrap and buildah's chroot isolation need root")
    tag = uuid.uuid4().hex[:8]
    rootfs = tmp_path / "rootfs"
    _run(debootstrap, "--variant=minbase", "bookworm", str(rootfs),
         "http://deb.debian.org/debian", timeout=600)
    base = f"localhost/gpuflops-test-base-{tag}"
    ctr = _run(buildah, "from", "scratch").strip()
    made.append(ctr)
    _run(buildah, "copy", "--quiet", ctr, str(rootfs), "/")
    _run(buildah, "commit", "--quiet", ctr, base)
    made.append(base)
    shutil.rmtree(rootfs, ignore_errors=True)

    context = tmp_path / "context"
    context.mkdir()
    shutil.copy(REPO / "Containerfile", context / "Containerfile")
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(context / "wheels"),
         f"{REPO}[central,kubernetes]", timeout=600)
    image = f"localhost/gpuflops-test:{tag}"
    _run(buildah, "build", "--quiet", "--isolation", "chroot", "--build-arg", f"BASE={base}",
         "-f", "Containerfile", "-t", image, ".", cwd=context, timeout=900)
    made.append(image)

    run_ctr = _run(buildah, "from", image).strip()
    made.append(run_ctr)
    version = _run(buildah, "run", "--isolation", "chroot", run_ctr, "--",
                   "/opt/gpuflops/bin/gpuflops", "--version")
    assert version.strip() == f"gpuflops, version {__version__}"
    # The chart's `central serve` Deployment runs this image: the central extra is in it.
    serve = _run(buildah, "run", "--isolation", "chroot", run_ctr, "--",
                 "/opt/gpuflops/bin/gpuflops", "central", "serve", "--help")
    assert "--central" in serve
    # And the chart's podResources option needs the kubernetes extra's grpcio and protobuf.
    grpc_ok = _run(buildah, "run", "--isolation", "chroot", run_ctr, "--",
                   "/opt/gpuflops/bin/python", "-c",
                   "from gpuflops.identity.podresources import message_classes as m; "
                   "print(sorted(m()))")
    assert "ListPodResourcesResponse" in grpc_ok
    demo = subprocess.run(
        [buildah, "run", "--isolation", "chroot", run_ctr, "--", "/opt/gpuflops/bin/gpuflops",
         "daemon", "--demo", "--no-loop", "--speed", "1000", "--no-socket", "--no-ledger",
         "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=300, env=ENV)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "serving /metrics" in demo.stderr and "Traceback" not in demo.stderr
