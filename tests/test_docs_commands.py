"""Every command in a fenced ``sh`` block of README.md and docs/*.md runs as written.

Each block runs as one bash script (``set -euo pipefail``) from the repository root, so a
background daemon started on one line serves the next ones. ``gpuflops`` on PATH is this
checkout. The few commands that cannot run here are listed below, each with its reason; a
listed command that no document uses any more fails the test, so the list cannot grow stale.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

# Command prefix -> why it cannot run in a test.
CANNOT_RUN_HERE: dict[str, str] = {
    "python3 -m pip install -e .": "CI (.ci/run) runs exactly this before the tests; this test "
                                   "runs in that install (and would re-point a shared one)",
    "sudo ": "installs into the host as root (/opt, /usr, /etc, systemd units, kernel module "
             "options); tests/deploy/test_systemd.py checks the files it installs",
    "systemctl ": "needs systemd as PID 1 on a GPU host",
    "curl -s localhost:9450/metrics": "reads the daemon the systemctl line above started",
    "echo 'options nvidia": "changes the NVIDIA kernel module's options on a GPU host",
    "helm install ": "needs a Kubernetes cluster; tests/deploy/test_helm_chart.py renders the "
                     "chart with these values",
    "pip install 'gpuflops[central]'": "installs into the environment the tests run in; .ci/run "
                                       "installs the test extra, which has the central extra's "
                                       "packages",
    "gpuflops central ": "needs the operator's PostgreSQL (pg.example, $OWNER_URL, ...); "
                         "tests/cli/test_central_cli.py, test_gate_cli.py and "
                         "tests/e2e/test_fleet_clusters.py run these commands against a real one",
    "gpuflops daemon ... ": "`...` stands for a GPU node's other daemon flags; "
                            "tests/e2e/test_fleet_kill9.py runs daemons that ship",
    "gpuflops verify --central ": "needs the operator's PostgreSQL; "
                                  "tests/cli/test_central_cli.py runs it with --pins",
}
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^( *)```sh\n(.*?)^\1```", re.S | re.M)


def sh_blocks() -> list[tuple[str, list[str]]]:
    """(file:line, commands) of every ``sh`` block; continuation lines joined, comments out."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in _BLOCK.finditer(text):
            body = "\n".join(line[len(m.group(1)):] for line in m.group(2).splitlines())
            joined = re.sub(r"\\\n\s*", " ", body)
            commands = [line.strip() for line in joined.splitlines()
                        if line.strip() and not line.strip().startswith("#")]
            where = f"{doc.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
            out.append((where, commands))
    return out


def _skipped(command: str) -> str | None:
    return next((p for p in CANNOT_RUN_HERE if command.startswith(p)), None)


def test_the_list_of_commands_that_cannot_run_here_is_used() -> None:
    used = {_skipped(c) for _w, cmds in sh_blocks() for c in cmds} - {None}
    assert set(CANNOT_RUN_HERE) == used


def test_the_quick_start_is_a_block_that_runs() -> None:
    where = [w for w, cmds in sh_blocks() if any(c.startswith("gpuflops run") for c in cmds)]
    assert where and where[0].startswith("README.md")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize(("where", "commands"), sh_blocks(), ids=[w for w, _ in sh_blocks()])
def test_documented_commands_run_as_written(where: str, commands: list[str],
                                            tmp_path: Path) -> None:
    runnable = [c for c in commands if _skipped(c) is None]
    if not runnable:
        pytest.skip(f"{where}: every command is listed in CANNOT_RUN_HERE")
    if any("9450" in c for c in runnable) and not _port_free(9450):
        pytest.fail("port 9450, which the documented commands use, is taken on this machine")
    # The paths the quick start names, as a fresh machine has them: absent.
    for path in ("/tmp/gpuflops.sock", "/tmp/gpuflops-state", "/tmp/gpuflops-report.html"):
        shutil.rmtree(path, ignore_errors=True) if Path(path).is_dir() else \
            Path(path).unlink(missing_ok=True)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "gpuflops").write_text(f'#!/bin/sh\nexec {sys.executable} -m gpuflops "$@"\n')
    (shim / "gpuflops").chmod(0o755)
    (shim / "python3").symlink_to(sys.executable)
    script = "set -euo pipefail\n" + "\n".join(
        c if _skipped(c) is None else f": 'not run here: {c[:40]}'" for c in commands) + "\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLOPS_")}
    env.update(PATH=f"{shim}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT), COLUMNS="160")
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # a daemon the block left running
    assert proc.returncode == 0, f"{where} failed:\n{script}\n{out[-4000:]}"
    if where.startswith("README.md") and any(c.startswith("gpuflops run") for c in commands):
        # The acceptance of the quick start: a job registered and a report out.
        report = Path("/tmp/gpuflops-report.html").read_text()
        assert "quickstart-1" in report, report[:2000]
        assert re.search(r"ok: \d+ records", out), out[-2000:]
        assert "hmma" in out and "dfma" in out  # the status view
        assert "full: total" in out  # the estimate, with the config's sequence length
