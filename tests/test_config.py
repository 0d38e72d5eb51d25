"""Settings: TOML loading, unknown keys and bad values refused with the setting named."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuflops.config import Settings, SettingsError, load_settings


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gpuflops.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file() -> None:
    s = load_settings(None).validate()
    assert s == Settings()
    assert s.interval_s == 0.5 and s.clock_period_s == 0.1 and s.hmma_precision == "bf16"
    assert s.backend == "auto" and s.listen == "0.0.0.0:9450"


def test_toml_values_are_loaded(tmp_path: Path) -> None:
    s = load_settings(_toml(tmp_path, """
[daemon]
backend = "replay"
listen = "127.0.0.1:9999"
interval_s = 0.2
clock_period_s = 0.05
hmma_precision = "fp8"
hmma_precision_per_gpu = { "1" = "tf32" }
job_sources = ["slurm", "env"]
devices = [0, 2]
dcgm_bindings = ["/opt/dcgm"]
ledger_sync = "FULL"
socket_mode = 0o600

[programs]
ignored = "other tables belong to other readers"
""")).validate()
    assert s.backend == "replay" and s.listen == "127.0.0.1:9999"
    assert s.interval_s == 0.2 and s.clock_period_s == 0.05
    assert s.hmma_precision == "fp8" and s.hmma_precision_per_gpu == {"1": "tf32"}
    assert s.job_sources == ("slurm", "env") and s.devices == (0, 2)
    assert s.dcgm_bindings == ("/opt/dcgm",) and s.ledger_sync == "FULL" and s.socket_mode == 0o600


def test_flags_override_the_file(tmp_path: Path) -> None:
    s = load_settings(_toml(tmp_path, '[daemon]\ninterval_s = 0.2\nlisten = "a:1"\n'))
    s = s.with_overrides(interval_s=1.0, listen=None).validate()
    assert s.interval_s == 1.0 and s.listen == "a:1"


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    p = _toml(tmp_path, "[daemon]\ninterval = 0.5\nbackend = 'nvml'\nbogus = 1\n")
    with pytest.raises(SettingsError) as ei:
        load_settings(p)
    assert str(ei.value) == f"{p}: unknown settings ['bogus', 'interval']"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon\n", "Expected ']'"),
        ("daemon = 5\n", "[daemon] must be a table"),
        ('[daemon]\ninterval_s = "fast"\n', "interval_s"),
        ("[daemon]\nledger = 'yes'\n", "ledger"),
        ("[daemon]\njob_sources = 'env'\n", "job_sources"),
        ("[daemon]\ndevices = [0, 'x']\n", "devices"),
        ("[daemon]\nhmma_precision_per_gpu = 'bf16'\n", "hmma_precision_per_gpu"),
        ("[daemon]\nreplay_path = 3\n", "replay_path"),
    ],
)
def test_bad_files_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    p = _toml(tmp_path, text)
    with pytest.raises(SettingsError) as ei:
        load_settings(p).validate()
    assert str(ei.value).startswith(f"{p}: ")
    assert message in str(ei.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="No such file"):
        load_settings(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backend": "cuda"}, "backend must be auto, nvml, dcgm or replay"),
        ({"interval_s": 0.05}, "interval_s must be a finite number in [0.1, 3600], got 0.05"),
        ({"interval_s": float("inf")}, "interval_s must be a finite number in [0.1, 3600], got inf"),
        ({"interval_s": float("nan")}, "interval_s must be a finite number"),
        ({"clock_period_s": 0.0}, "clock_period_s must be a finite number in (0, 3600]"),
        ({"clock_period_s": 0.6}, "clock_period_s must be in (0, interval_s]"),
        ({"attribution_hold_s": -5.0}, "attribution_hold_s must be a finite number in [0, 600], "
                                       "got -5.0"),
        ({"series_ttl_s": float("inf")}, "series_ttl_s must be a finite number"),
        ({"analytic_bound_slack": 0.5}, "analytic_bound_slack must be a finite number in [1, 1000]"),
        ({"ledger_commit_s": -1.0}, "ledger_commit_s must be a finite number in [0, 3600]"),
        ({"program_refresh_s": 0.0}, "program_refresh_s must be a finite number in (0, 86400]"),
        ({"socket_mode": 0o777}, "socket_mode 0o777 gives other users access to the job socket"),
        ({"socket_mode": 0o662}, "socket_mode 0o662 gives other users access"),
        ({"socket_mode": 0o1660}, "socket_mode 0o1660 is not a permission mode"),
        ({"socket_mode": 0o060}, "must let its owner read and write"),
        ({"devices": (0, -1)}, "devices must be GPU indexes >= 0"),
        ({"hmma_precision": "fp64"}, "hmma_precision: precision 'fp64'"),
        ({"hmma_precision_per_gpu": {"3": "int8"}}, "3: precision 'int8'"),
        ({"ledger_sync": "OFF"}, "ledger_sync must be NORMAL or FULL"),
        ({"replay_speed": 0.0}, "replay_speed must be a finite number in (0, 10000]"),
    ],
)
def test_validation_errors(change: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError) as ei:
        Settings().with_overrides(**change).validate()
    assert message in str(ei.value)


def test_every_setting_can_be_set_from_toml_with_its_default(tmp_path: Path) -> None:
    """Each field's type is checked on load; writing every default back must round-trip."""
    import tomllib
    from dataclasses import asdict

    lines = ["[daemon]"]
    for key, value in asdict(Settings()).items():
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, dict):
            lines.append(f"{key} = {{}}")
            continue
        lines.append(f"{key} = {value!r}".replace("True", "true").replace("False", "false"))
    text = "\n".join(lines).replace("'", '"') + "\n"
    tomllib.loads(text)
    assert load_settings(_toml(tmp_path, text)) == Settings()


def test_shipped_example_config_names_every_setting_and_loads_uncommented(tmp_path: Path) -> None:
    from dataclasses import fields

    from gpuflops.config import Settings, load_settings

    example = Path(__file__).parents[1] / "systemd" / "config.toml.example"
    text = example.read_text()
    for f in fields(Settings):
        assert f"# {f.name} =" in text, f"{f.name} missing from {example.name}"
    # Uncommented, every example value is accepted.
    active = "\n".join(
        line[2:] if line.startswith("# ") and " = " in line.split("#", 2)[1] else line
        for line in text.splitlines()
    )
    path = tmp_path / "c.toml"
    path.write_text(active)
    settings = load_settings(path).validate()
    assert settings.hmma_precision_per_gpu == {"0": "fp8"}
    assert settings.devices == (0, 1)


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    from gpuflops.config import env_settings, resolve_settings

    p = _toml(tmp_path, '[daemon]\nstate_dir = "/from/file"\nlisten = "a:1"\ninterval_s = 0.2\n')
    env = {"GPUFLOPS_CONFIG": str(p), "GPUFLOPS_STATE_DIR": "/from/env", "GPUFLOPS_SOCKET": "/s",
           "GPUFLOPS_DEVICES": "0, 2", "GPUFLOPS_LEDGER": "no", "GPUFLOPS_SOCKET_MODE": "0o600",
           "GPUFLOPS_HMMA_PRECISION_PER_GPU": "1=tf32", "GPUFLOPS_WEB_CONFIG": "",
           "GPUFLOPS_JOB": "not a setting: the job identity of a training process"}
    s = resolve_settings(None, environ=env, listen="b:2", state_dir=None).validate()
    assert s.state_dir == "/from/env"  # env over file
    assert s.listen == "b:2"  # flag over file
    assert s.interval_s == 0.2  # file over default
    assert s.socket_path == "/s" and s.devices == (0, 2) and s.ledger is False
    assert s.socket_mode == 0o600 and s.hmma_precision_per_gpu == {"1": "tf32"}
    assert s.web_config is None
    assert resolve_settings(None, environ=env, state_dir="/flag").state_dir == "/flag"
    assert env_settings({"GPUFLOPS_SOCKET_PATH": "/generic"})["socket_path"] == "/generic"
    with pytest.raises(SettingsError, match=r"\$GPUFLOPS_INTERVAL_S: 'fast' is not a number"):
        env_settings({"GPUFLOPS_INTERVAL_S": "fast"})
    with pytest.raises(SettingsError, match="configuration file not found"):
        resolve_settings(None, environ={"GPUFLOPS_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize(("listen", "web", "url"), [
    ("0.0.0.0:9450", "", "http://127.0.0.1:9450/metrics"),
    ("[::]:9450", "", "http://[::1]:9450/metrics"),
    ("10.0.0.5:1234", "tls_server_config:\n  cert_file: a\n", "https://10.0.0.5:1234/metrics"),
])
def test_status_url_follows_the_listen_address_and_tls(tmp_path: Path, listen: str, web: str,
                                                       url: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(web)
    assert Settings(listen=listen, web_config=str(path)).status_url() == url


def test_requires_python_matches_what_is_tested() -> None:
    """tomllib is stdlib from 3.11; CI tests 3.11, so that is what pyproject promises."""
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert "Programming Language :: Python :: 3.11" in project["classifiers"]
