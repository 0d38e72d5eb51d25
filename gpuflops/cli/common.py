"""What the commands share: logging to stderr, the --state-dir option."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from gpuflops.config import DEFAULT_STATE_DIR


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path),
    default=Path(DEFAULT_STATE_DIR), show_default=True, help="Directory holding ledger.sqlite3.")
