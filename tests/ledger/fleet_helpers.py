"""Shared by the central-store tests: fill a real ledger with varied records; read it back."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuflops.ledger.central import CentralStore
from gpuflops.ledger.records import NODE
from gpuflops.ledger.ship import RawChainReader, Shipper
from gpuflops.ledger.signing import SigningKey, generate_key
from gpuflops.ledger.store import Ledger
from gpuflops.model import FlopsRow
from tests.central_fixtures import CentralDb

T0 = 1_760_000_000.0

JOBS = [("job-a", "prog"), ("job-b", "prog"), ("job-c", "other"), ("unattributed", "unattributed")]


def fill(ledger: Ledger, rng: random.Random, n: int, t0: float) -> float:
    """Append ``n`` varied records (intervals of several jobs and GPUs, registrations,
    estimates, half-rate claims, ends, gaps, sessions); returns the time after the last one."""
    t = t0
    for _ in range(n):
        r = rng.random()
        job, program = rng.choice(JOBS)
        if r < 0.70:
            rows = [FlopsRow(str(g), f"GPU-{g}", rng.choice(["hmma", "fp32"]), "bf16",
                             *rng.choice(JOBS), 100 + g, rng.uniform(1e12, 3e14) * rng.choice([1, 1e-3]))
                    for g in range(rng.randint(1, 4))]
            ledger.append_interval(t, t + 0.5, rows)
        elif r < 0.80 and program != "unattributed":
            w0 = t - rng.uniform(0, 5)
            ledger.append_job_event("estimate", job, program, {
                "analytic_flops": rng.uniform(1e12, 1e15), "tokens": float(rng.randint(1, 9999)),
                "recompute_flops": rng.uniform(0, 1e13), "window_t0_s": w0, "window_t1_s": t},
                t)
        elif r < 0.84 and program != "unattributed":
            ledger.append_job_event(rng.choice(["register", "end"]), job, program,
                                    {"attempt": rng.randint(1, 3), "node": "n1", "rank": 0}, t)
        elif r < 0.86 and program != "unattributed":
            ledger.append_job_event("claim", job, program, {
                "kind": "half_rate_tensor_fraction", "value": rng.choice([0.0, 0.25, rng.random()]),
                "sampled_steps": 1, "evidence": "test"}, t)
        elif r < 0.93:
            ledger.append_gap(t - 1.0, t, rng.choice(["gpm_read", "timeout"]), [("0", "GPU-0")])
        else:
            ledger.append_session(rng.choice(["alive", "start", "stop"]), t, {"v": 1})
        t += 0.5
    return t


def local_jobs(path: Path) -> dict[tuple[str, str], tuple[Any, ...]]:
    """Every column of a node ledger's job_totals, in ``JobTotals.row()`` order."""
    led = Ledger.open(path, clock=time.time, readonly=True)
    try:
        return {(k.job, k.program): (v.measured_flops, v.analytic_flops, v.tokens,
                                     v.recompute_flops, v.estimate_t0_s, v.estimate_t1_s,
                                     v.first_t_s, v.last_t_s, v.hmma_flops, v.half_rate_fraction)
                for k, v in led.totals().jobs.items()}
    finally:
        led.close()


def central_jobs(store: CentralStore, ledger_id: str) -> dict[tuple[str, str], tuple[Any, ...]]:
    return {(r[0], r[1]): tuple(r[2:]) for r in store.job_rows(ledger_id)}


def local_gaps(path: Path) -> list[tuple[Any, ...]]:
    led = Ledger.open(path, clock=time.time, readonly=True)
    try:
        return sorted((g.seq, g.gpu, g.uuid, g.t0_s, g.t1_s, g.reason) for g in led.gaps())
    finally:
        led.close()


def central_gaps(store: CentralStore, ledger_id: str) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in store.fetch(
        "SELECT raw_seq, gpu, uuid, t0_s, t1_s, reason FROM gpuflops.gaps WHERE ledger_id = %s",
        (ledger_id,)))


@dataclass
class Fleet:
    central: CentralDb
    ledgers: dict[str, Path]  # node -> ledger path
    ids: dict[str, str]  # node -> ledger id
    keys: dict[str, SigningKey]


def ship_fleet(central: CentralDb, tmp_path: Path) -> Fleet:
    """Three node ledgers (a and b in cluster c1, c in c2) with program ``prog``, shipped."""
    rng = random.Random(3)
    paths, ids, keys = {}, {}, {}
    for i, (node, cluster) in enumerate([("a", "c1"), ("b", "c1"), ("c", "c2")]):
        path = tmp_path / node / "ledger.sqlite3"
        led = Ledger.open(path, clock=lambda: T0)
        led.append_job_event("register", f"train-{node}", "prog", {
            "attempt": 1, "base_model_compute_flops": 3e20, "precision": "bf16"}, T0)
        fill(led, rng, 400, T0 + i)
        led.close()
        key = generate_key(tmp_path / node / "node.key")
        shipper = Shipper(central.store("gf_ship"), RawChainReader(path), key, node=node,
                          cluster=cluster, period_s=10.0)
        assert shipper.run_once() > 400
        ids[node] = str(shipper.status().ledger_id)
        shipper.store.close()
        paths[node], keys[node] = path, key
    return Fleet(central, paths, ids, keys)


__all__ = ["JOBS", "NODE", "Fleet", "central_gaps", "central_jobs", "fill", "local_gaps",
           "local_jobs", "ship_fleet"]


# Shippers a test made, closed after it by the autouse fixture in tests/ledger/conftest.py.
MADE_SHIPPERS: list[Shipper] = []


def close_made_shippers() -> None:
    while MADE_SHIPPERS:
        s = MADE_SHIPPERS.pop()
        s.store.close()
        s.reader.close()
