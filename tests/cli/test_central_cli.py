"""`gpuflops central init`, `central nodes --pins-out` and `verify --central --pins` as
docs/fleet.md runs them, against a real PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpuflops.ledger.central import CENTRAL_SCHEMA_VERSION
from tests.central_fixtures import CentralDb
from tests.e2e.fleet_harness import gpuflops
from tests.ledger.fleet_helpers import Fleet, ship_fleet


@pytest.fixture
def fleet(central: CentralDb, tmp_path: Path) -> Fleet:
    return ship_fleet(central, tmp_path)


def test_init_is_idempotent_and_refuses_a_store_of_another_version(central: CentralDb) -> None:
    r = gpuflops("central", "init", "--central", central.admin_url)
    assert r.returncode == 0, r.stderr
    assert f"already at version {CENTRAL_SCHEMA_VERSION}" in r.stdout
    with central.admin() as admin:  # a store created before the v4 ledger columns shipped
        admin.execute("UPDATE gpuflops.meta SET value = '1' WHERE key = 'schema_version'")
    r = gpuflops("central", "init", "--central", central.admin_url)
    assert r.returncode == 1
    assert f"central schema version 1, this gpuflops knows {CENTRAL_SCHEMA_VERSION}" in r.stderr


def test_pins_written_by_nodes_are_what_verify_checks(fleet: Fleet, tmp_path: Path) -> None:
    c = fleet.central
    read = ["--central", c.url("gf_read"), "--central-password-file", str(c.password_file)]
    pins = tmp_path / "pins.json"
    r = gpuflops("central", "nodes", *read, "--pins-out", str(pins))
    assert r.returncode == 0, r.stderr
    doc = json.loads(pins.read_text())
    assert doc["nodes"] == {n: k.public_key.hex() for n, k in fleet.keys.items()}
    r = gpuflops("verify", *read, "--pins", str(pins))
    assert r.returncode == 0, r.stderr
    doc["nodes"]["b"] = fleet.keys["a"].public_key.hex()  # a key that is not b's
    pins.write_text(json.dumps(doc))
    r = gpuflops("verify", *read, "--pins", str(pins))
    assert r.returncode == 1 and "node b" in r.stderr and "pinned key" in r.stderr, r.stderr
