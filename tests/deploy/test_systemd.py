"""The systemd unit, sysusers and tmpfiles entries, checked by systemd's own tools."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.tooling import REPO, require_tool

UNIT = REPO / "systemd" / "gpuflops.service"
SYSUSERS = REPO / "systemd" / "gpuflops.sysusers"
TMPFILES = REPO / "systemd" / "gpuflops.tmpfiles"
EXEC_PREFIX = "ExecStart=/usr/local/bin/gpuflops "


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze verify on a copy whose ExecStart names a binary that exists here."""
    tool = require_tool("systemd-analyze", "systemd")
    # verify insists that the ExecStart binary exists; the real one is installed only on hosts.
    assert EXEC_PREFIX in unit_text
    copy = tmp_path / "gpuflops.service"
    copy.write_text(unit_text.replace(EXEC_PREFIX, "ExecStart=/bin/true "))
    # --man=no: no man pages in the container; works without systemd as PID 1.
    return subprocess.run(
        [tool, "verify", "--man=no", str(copy)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    result = _verify(UNIT.read_text(), tmp_path)
    # verify exits 0 on unknown keys or unparsable values and only warns: any word about our
    # file is a failure.
    assert result.returncode == 0, result.stderr
    assert "gpuflops.service" not in result.stderr + result.stdout, result.stderr


@pytest.mark.parametrize(
    ("good", "bad"),
    [("Type=notify", "Type=notifyy"), ("WatchdogSec=60s", "WatchdogSek=60s")],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, good: str, bad: str) -> None:
    text = UNIT.read_text()
    assert good in text
    result = _verify(text.replace(good, bad), tmp_path)
    assert "gpuflops.service" in result.stderr


def test_unit_runs_the_daemon_with_the_agreed_flags() -> None:
    text = UNIT.read_text().replace("\\\n", " ")
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    args = exec_line.split()[1:]
    assert args[0] == "daemon"
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags == {
        "--listen": "0.0.0.0:9450",
        "--socket": "/run/gpuflops/gpuflops.sock",
        "--socket-group": "gpuflops",
        "--state-dir": "/var/lib/gpuflops",
        "--config": "/etc/gpuflops/config.toml",
        "--web-config": "/etc/gpuflops/web-config.yml",
    }
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z]\w+=", line)
    )
    # Reload is SIGHUP, which the daemon handles (it would otherwise die without a stop record).
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # The directories the flags name must be the ones systemd creates for the service.
    assert settings["RuntimeDirectory"] == "gpuflops"
    assert settings["StateDirectory"] == "gpuflops"
    assert settings["Type"] == "notify"
    assert settings["User"] == settings["Group"] == "gpuflops"


def test_sysusers_and_tmpfiles_create_the_account_and_config_dir(tmp_path: Path) -> None:
    sysusers = require_tool("systemd-sysusers", "systemd")
    tmpfiles = require_tool("systemd-tmpfiles", "systemd")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib/sysusers.d").mkdir(parents=True)
    (root / "usr/lib/tmpfiles.d").mkdir(parents=True)
    (root / "usr/lib/sysusers.d/gpuflops.conf").write_text(SYSUSERS.read_text())
    (root / "usr/lib/tmpfiles.d/gpuflops.conf").write_text(TMPFILES.read_text())
    subprocess.run(
        [sysusers, f"--root={root}", "gpuflops.conf"],
        check=True, capture_output=True, timeout=60,
    )
    groups = {
        line.split(":")[0]: int(line.split(":")[2])
        for line in (root / "etc/group").read_text().splitlines()
    }
    passwd = (root / "etc/passwd").read_text().splitlines()
    users = {line.split(":")[0]: line.split(":") for line in passwd}
    assert "gpuflops" in groups
    assert users["gpuflops"][3] == str(groups["gpuflops"])
    assert users["gpuflops"][6] == "/usr/sbin/nologin"
    subprocess.run(
        [tmpfiles, f"--root={root}", "--create", "gpuflops.conf"],
        check=True, capture_output=True, timeout=60,
    )
    conf_dir = (root / "etc/gpuflops").stat()
    assert conf_dir.st_mode & 0o777 == 0o750
    assert conf_dir.st_uid == 0
    assert conf_dir.st_gid == groups["gpuflops"]


def test_ledger_files_are_not_group_writable() -> None:
    # Training users join the group for the socket; they must not be able to alter the ledger.
    umask = next(line for line in UNIT.read_text().splitlines() if line.startswith("UMask="))
    assert int(umask.split("=")[1], 8) & 0o020
