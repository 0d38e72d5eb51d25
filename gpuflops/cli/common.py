"""What the commands share: logging (logfmt or JSON on stderr), and finding the daemon's
settings (socket, state directory, endpoint) the way the daemon itself does."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from gpuflops.config import LOG_FORMATS, LOG_LEVELS, Settings, SettingsError, resolve_settings


class _Logfmt(logging.Formatter):
    """``ts=... level=info logger=... msg="..."``, as exporter-toolkit's logfmt writes."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record, self)
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record, self), ensure_ascii=False)


def _fields(record: logging.LogRecord, fmt: logging.Formatter) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": {"WARNING": "warn", "CRITICAL": "error"}.get(record.levelname,
                                                              record.levelname.lower()),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    if record.exc_info:
        out["exc"] = fmt.formatException(record.exc_info)
    return out


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def setup_logging(verbose: int = 0, level: str = "info", fmt: str = "logfmt") -> None:
    """Configure the root logger on stderr; ``-v`` lowers the level one step per use."""
    base = LOG_LEVELS.get(level, logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if fmt == "json" else _Logfmt())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(base - 10 * verbose, logging.DEBUG))


def settings_or_exit(config: str | Path | None = None, **flags: Any) -> Settings:
    """The daemon's settings as this command sees them (flags > env > file > defaults)."""
    try:
        return resolve_settings(config, **flags).validate()
    except SettingsError as e:
        raise click.ClickException(str(e)) from None


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    help="Daemon configuration (TOML, [daemon] table) [$GPUFLOPS_CONFIG].")
state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False), default=None,
    help="Directory holding ledger.sqlite3 [$GPUFLOPS_STATE_DIR, the config file's state_dir, "
         "or /var/lib/gpuflops].")
log_level_option = click.option("--log.level", "log_level", type=click.Choice(list(LOG_LEVELS)),
                                default=None, help="Log level [$GPUFLOPS_LOG_LEVEL, info].")
log_format_option = click.option("--log.format", "log_format", type=click.Choice(LOG_FORMATS),
                                 default=None, help="Log format [$GPUFLOPS_LOG_FORMAT, logfmt].")
