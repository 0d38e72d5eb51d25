"""The ``--central URL`` / ``--central-password-file`` options, without importing psycopg
(it is an optional dependency: the commands import the store only when given a URL)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def central_options(required: bool = True) -> Callable[[F], F]:
    """``--central URL`` (env GPUFLOPS_CENTRAL_URL) and ``--central-password-file FILE``."""

    def wrap(fn: F) -> F:
        fn = click.option("--central-password-file", "central_password_file",
                          type=click.Path(dir_okay=False, path_type=Path), default=None,
                          help="File holding the password (else PGPASSWORD / PGPASSFILE).")(fn)
        return click.option("--central", "central_url", metavar="URL", required=required,
                            envvar="GPUFLOPS_CENTRAL_URL", default=None,
                            help="Central store: a libpq URL without password "
                                 "(env GPUFLOPS_CENTRAL_URL).")(fn)

    return wrap


def pins_option(fn: F) -> F:
    return click.option("--pins", "pins_path", type=click.Path(dir_okay=False, path_type=Path),
                        default=None,
                        help="Pinned node and signer keys (JSON; `central nodes --pins-out`).")(fn)
