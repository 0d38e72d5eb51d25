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
        ({"interval_s": 0.05}, "interval must be >= 0.1 s"),
        ({"clock_period_s": 0.0}, "clock_period_s must be in (0, interval_s]"),
        ({"clock_period_s": 0.6}, "clock_period_s must be in (0, interval_s]"),
        ({"hmma_precision": "fp64"}, "hmma_precision: precision 'fp64'"),
        ({"hmma_precision_per_gpu": {"3": "int8"}}, "3: precision 'int8'"),
        ({"ledger_sync": "OFF"}, "ledger_sync must be NORMAL or FULL"),
        ({"replay_speed": 0.0}, "replay_speed must be positive"),
    ],
)
def test_validation_errors(change: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError) as ei:
        Settings().with_overrides(**change).validate()
    assert message in str(ei.value)


def test_every_setting_can_be_set_from_toml_with_its_default(tmp_path: Path) -> None:
    """Each field's type is checked on load; writing every default back must round-trip."""
    from dataclasses import asdict

    import tomllib

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
