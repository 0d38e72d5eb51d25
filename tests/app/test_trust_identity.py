"""Issue 13's identity attacks against a real daemon, from processes of real users: alice and bob
are in the socket group, carol is not. Each attack must be refused with a clear error and must
change nothing already recorded."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuflops.ledger.chain import verify_path
from gpuflops.ledger.records import LEDGER_FILENAME
from gpuflops.ledger.store import Ledger
from tests.app.trust_support import (
    GROUP,
    DaemonProcess,
    LocalUsers,
    as_user,
    remapped_demo,
    spawn_as,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates users; CI runs as root")


@pytest.fixture(scope="module")
def users() -> Iterator[LocalUsers]:
    u = LocalUsers()
    yield u
    u.close()




def _ledger(d: DaemonProcess) -> Ledger:
    return Ledger.open(d.state / LEDGER_FILENAME, clock=time.time, readonly=True)


def _value(d: DaemonProcess, name: str, **labels: str) -> float | None:
    m = d.metrics() or {}
    for lab, v in m.get(name, []):
        if all(lab.get(k) == x for k, x in labels.items()):
            return v
    return None


def _wait(pred: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_environment_attribution_needs_a_uid_that_may_write_the_job(users: LocalUsers,
                                                                    tmp: Path) -> None:
    """bob's process carries GPUFLOPS_JOB=alice-job GPUFLOPS_PROGRAM=alice-prog: its FLOPs are
    not charged to alice; alice's own process with the same environment is."""
    env = {"GPUFLOPS_JOB": "alice-job", "GPUFLOPS_PROGRAM": "alice-prog"}
    bob, alice = spawn_as(users, "bob", env), spawn_as(users, "alice", env)
    try:
        # The demo's single-process phases (pid 458) run in bob's process, the shared phase's
        # first process (1470) in alice's.
        trace = remapped_demo(tmp / "t.jsonl", {458: bob.pid, 1470: alice.pid})
        d = DaemonProcess(tmp, replay=trace, speed=20.0,
                          args=["--socket-group", GROUP, "--no-loop"])
        d.wait_ready()
        reply = as_user(users, "alice", d.sock, [{"op": "register", "job": "alice-job",
                                                  "program": "alice-prog"}])
        assert reply[0]["ok"]
        assert d.wait(60) == 0  # the trace ends
    finally:
        bob.kill()
        alice.kill()
        bob.wait()
        alice.wait()
    assert "names job alice-job of program alice-prog through env, which its uid may not write" \
        in d.output()
    led = _ledger(d)
    try:
        jobs = {(k.job, k.program): t.measured_flops for k, t in led.totals().jobs.items()}
    finally:
        led.close()
    # The single-process phases executed ~3.5e16 FLOPs in bob's process: unattributed now.
    assert jobs[("unattributed", "unattributed")] > 3e16
    assert 0 < jobs[("alice-job", "alice-prog")] < 1e16  # alice's own process only


def test_another_user_cannot_join_or_redefine_a_program(users: LocalUsers, tmp: Path) -> None:
    d = DaemonProcess(tmp, args=["--socket-group", GROUP]).wait_ready()
    try:
        first = as_user(users, "alice", d.sock, [
            {"op": "register", "job": "alice-job", "program": "alice-prog"},
            {"op": "add", "job": "alice-job", "flops": 1e12, "tokens": 10}])
        assert [r["ok"] for r in first] == [True, True]
        attack = as_user(users, "bob", d.sock, [
            {"op": "register", "job": "bob-job", "program": "alice-prog",
             "base_model_flops": 1e20, "systemic_risk": True},
            {"op": "register", "job": "bob-job", "program": "alice-prog"},
            {"op": "add", "job": "alice-job", "flops": 1e40, "tokens": 1},
            # Squatting the next job id of alice's program is refused as well.
            {"op": "register", "job": "alice-job-2", "program": "alice-prog"}])
        assert [r.get("error") for r in attack] == ["forbidden"] * 4
        assert "may not register jobs into program 'alice-prog' (owned by uid" \
            in attack[0]["detail"]
        # alice (the owner) sets the facts once; changing them later is a conflict.
        own = as_user(users, "alice", d.sock, [
            {"op": "register", "job": "alice-job", "program": "alice-prog",
             "base_model_flops": 3e23},
            {"op": "register", "job": "alice-job", "program": "alice-prog",
             "systemic_risk": True, "base_model_flops": 1e20}])
        assert own[0]["ok"] and own[1]["error"] == "conflict"
        _wait(lambda: _value(d, "gpuflops_program_threshold_flops", program="alice-prog",
                             rule="one_third_of_base") == pytest.approx(1e23))
        # alice-prog's threshold is one third of the base model alice registered, never the
        # systemic-risk one bob tried; and its analytic total is alice's 1e12.
        _wait(lambda: _value(d, "gpuflops_job_analytic_flops_total", job_id="alice-job")
              == 1e12)
    finally:
        d.stop()
    led = _ledger(d)
    try:
        refused = [e for e in led.job_events("alice-prog") if e.kind == "refused"]
        registers = [e for e in led.job_events("alice-prog") if e.kind == "register"]
    finally:
        led.close()
    # bob's add to alice's job is kept as evidence, with his uid; it changed no total.
    assert [(e.payload["reason"], e.payload["uids"], e.payload["flops"]) for e in refused] \
        == [("forbidden", [users["bob"].uid], 1e40)]
    assert {e.payload["peer"]["uid"] for e in registers} == {users["alice"].uid}
    assert verify_path(d.state / LEDGER_FILENAME).ok


def test_program_policy_names_who_may_use_and_define_a_program(users: LocalUsers,
                                                               tmp: Path) -> None:
    programs = tmp / "programs.toml"
    programs.write_text('[defaults.access]\nfirst_registrant_owns = false\n'
                        '[programs.team-prog.access]\nowners = ["gfalice"]\n'
                        f'groups = ["{GROUP}"]\n'
                        '[programs.shared-prog.access]\nowners = ["gfalice"]\n'
                        f'job_group = "{GROUP}"\n')
    d = DaemonProcess(tmp, args=["--socket-group", GROUP, "--programs", str(programs)])
    d.wait_ready()
    try:
        bob = as_user(users, "bob", d.sock, [
            # A member of the group registers jobs, but does not define the program...
            {"op": "register", "job": "bob-run", "program": "team-prog"},
            {"op": "register", "job": "bob-run", "program": "team-prog", "systemic_risk": True},
            # ...and a program nobody listed is nobody's to take.
            {"op": "register", "job": "bob-own", "program": "unlisted-prog"}])
        assert [r.get("error") for r in bob] == [None, "forbidden", "forbidden"]
        assert "only the owner of program 'team-prog'" in bob[1]["detail"]
        alice = as_user(users, "alice", d.sock, [
            {"op": "register", "job": "alice-run", "program": "team-prog",
             "systemic_risk": False, "base_model_flops": 1e24},
            {"op": "add", "job": "bob-run", "flops": 1e12, "tokens": 1}])
        # alice defines the program; bob's job stays bob's (no job group configured).
        assert alice[0]["ok"] and alice[1]["error"] == "forbidden"
        # With a job group, its members write to the program's jobs (ranks run by teammates),
        # but still cannot register jobs of their own into it or set its facts.
        assert as_user(users, "alice", d.sock, [
            {"op": "register", "job": "shared-run", "program": "shared-prog"}])[0]["ok"]
        team = as_user(users, "bob", d.sock, [
            {"op": "add", "job": "shared-run", "flops": 1e12, "tokens": 1},
            {"op": "register", "job": "bob-shared", "program": "shared-prog"}])
        assert team[0]["ok"] and team[1]["error"] == "forbidden"
    finally:
        d.stop()


def test_world_writable_socket_is_refused_and_the_group_is_enforced(users: LocalUsers,
                                                                    tmp: Path) -> None:
    bad = DaemonProcess(tmp, env={"GPUFLOPS_SOCKET_MODE": "511"})
    assert bad.wait() != 0
    assert "socket_mode 0o777 gives other users access to the job socket" in bad.output()
    assert not bad.sock.exists() and not (bad.state / LEDGER_FILENAME).exists()
    d = DaemonProcess(tmp, args=["--socket-group", GROUP]).wait_ready()
    try:
        assert as_user(users, "carol", d.sock, [{"op": "ping"}]) \
            == {"connect_error": "PermissionError"}
        assert as_user(users, "bob", d.sock, [{"op": "ping"}])[0]["ok"]
    finally:
        d.stop()


def test_owners_ended_jobs_and_sequence_numbers_survive_restarts(users: LocalUsers,
                                                                 tmp: Path) -> None:
    d = DaemonProcess(tmp, args=["--socket-group", GROUP]).wait_ready()
    try:
        setup = as_user(users, "alice", d.sock, [
            {"op": "register", "job": "alice-job", "program": "alice-prog"},
            {"op": "add", "job": "alice-job", "flops": 5e12, "tokens": 1, "client": "c1",
             "seq": 1},
            {"op": "register", "job": "alice-done", "program": "alice-prog"},
            {"op": "end", "job": "alice-done", "final": True}])
        assert all(r["ok"] for r in setup)
        _wait(lambda: _value(d, "gpuflops_job_analytic_flops_total", job_id="alice-job")
              == 5e12)
    finally:
        d.stop()
    for how in ("SIGTERM", "SIGKILL"):
        d = DaemonProcess(tmp, args=["--socket-group", GROUP]).wait_ready()
        try:
            bob = as_user(users, "bob", d.sock, [
                {"op": "register", "job": "alice-job", "program": "alice-prog"},
                {"op": "add", "job": "alice-job", "flops": 7e21, "tokens": 1},
                {"op": "register", "job": "alice-job", "program": "bob-prog"},
                {"op": "query", "job": "alice-job"}])
            assert [r.get("error") for r in bob] == ["forbidden"] * 4
            alice = as_user(users, "alice", d.sock, [
                {"op": "register", "job": "alice-done", "program": "alice-prog"},
                {"op": "add", "job": "alice-done", "flops": 1.0, "tokens": 1},
                {"op": "register", "job": "alice-job", "program": "alice-prog"},
                # The batch sent before the restart, resent: applied once only.
                {"op": "add", "job": "alice-job", "flops": 5e12, "tokens": 1, "client": "c1",
                 "seq": 1},
                {"op": "query", "job": "alice-job"}])
            assert [r.get("error") for r in alice[:2]] == ["job_ended", "job_ended"]
            assert alice[2]["ok"] and alice[2]["created"] is False
            assert alice[3] == {"ok": True, "duplicate": True}
            job = alice[4]["job"]
            assert job["owner_uid"] == users["alice"].uid and job["analytic_flops"] == 5e12
        finally:
            d.stop(getattr(__import__("signal"), how))
    led = _ledger(d)
    try:
        totals = led.totals().jobs
    finally:
        led.close()
    assert {k.job: t.analytic_flops for k, t in totals.items() if k.program == "alice-prog"} \
        == {"alice-job": 5e12, "alice-done": 0.0}


def test_analytic_reports_are_bounded_by_the_gpus_physical_peak(tmp: Path) -> None:
    """One H100 (the demo): 8192 FLOPs/clock/SM x 132 SMs x 2.0 GHz = 2.16e15 FLOP/s; with the
    default slack of 4 a job may report 8.65e15 FLOPs per second since it registered (at least
    10 s). An honest job at the H100's full bf16 rate never comes near; 1e40 is refused."""
    from tests.jobs.jobsock_client import Client

    peak = 8192 * 132 * 2.0e9
    d = DaemonProcess(tmp).wait_ready()
    try:
        with Client(str(d.sock)) as c:
            assert c.call(op="register", job="honest", program="p")["ok"]
            assert c.call(op="register", job="greedy", program="p")["ok"]
            t0 = time.monotonic()
            reported = 0.0
            while time.monotonic() - t0 < 3.0:  # every step at the full bf16 rate, 1.08e15/s
                due = 4096 * 132 * 2.0e9 * (time.monotonic() - t0)
                assert c.call(op="add", job="honest", flops=due - reported, tokens=1)["ok"]
                reported = due
                time.sleep(0.05)
            refused = c.call(op="add", job="greedy", flops=1e40, tokens=1)
            assert refused["error"] == "bound"
            assert "more than this node's GPUs can execute" in refused["detail"]
            # Just under and just over the bound of a job registered ~3 s ago (10 s minimum).
            assert c.call(op="add", job="greedy", flops=peak * 4 * 9.5, tokens=1)["ok"]
            assert c.call(op="add", job="greedy", flops=peak * 4 * 1.0, tokens=1)["error"] \
                == "bound"
            greedy = c.call(op="query", job="greedy")["job"]
            assert greedy["analytic_flops"] == peak * 4 * 9.5
    finally:
        d.stop()
    led = _ledger(d)
    try:
        refused_events = [e for e in led.job_events("p") if e.kind == "refused"]
        totals = {k.job: t.analytic_flops for k, t in led.totals().jobs.items()}
    finally:
        led.close()
    assert {e.payload["reason"] for e in refused_events} == {"bound"}
    assert sum(e.payload["count"] for e in refused_events) == 2
    assert totals["greedy"] == peak * 4 * 9.5 and totals["honest"] == pytest.approx(reported)
