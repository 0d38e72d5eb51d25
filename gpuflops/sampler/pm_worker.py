"""PM sampling in a worker process per GPU, so CUPTI can never stall or crash the daemon.

Run 23 (H200, driver 580) showed why: with PM sampling inside the daemon, handing a GPU's
counters to Nsight Compute froze the whole daemon (its /metrics stopped answering within a second
and SIGTERM went unhandled): CUPTI's teardown blocked in the driver while holding Python's global
lock. A worker (``python -m gpuflops.sampler.cupti``) holds the CUDA context and the PM session
of one GPU and writes each decoded sample to its stdout as one JSON line; the daemon reads what
has arrived, waiting at most REPLY_WAIT_S for it, and ends the worker with a signal, which
always works.

Protocol. On the worker's stdout: first ``{"ready": true}`` once sampling runs, or ``{"error":
KIND, "detail": ...}`` and exit. Then, for every line the daemon writes to the worker's stdin (a
decode request, sent at the end of each sampling interval), ``[start_ns, end_ns, sm_cycles,
tensor_cycles]`` per sample completed since the last decode and ``{"decoded": n}``. Decoding on
request rather than on a timer keeps the worker's CPU to two decodes a second at the default
interval and gives each interval the samples up to its end (run 25: a timer every 50 ms cost
27% of a core).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from gpuflops.sampler.pm import PmDevice, PmError

START_TIMEOUT_S = 20.0  # CUDA initialisation and the first PM configuration (~2 s measured)
STOP_GRACE_S = 2.0
# How long a read waits for the worker's answer to its decode request (measured: ~1 ms); a
# later answer is taken by the next read.
REPLY_WAIT_S = 0.05


class WorkerOpener:
    """A PmOpener that starts one worker process per GPU session."""

    def __init__(self, command: Sequence[str] | None = None, env: dict[str, str] | None = None,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self._command = list(command or [sys.executable, "-m", "gpuflops.sampler.cupti"])
        self._env = env
        self._start_timeout = start_timeout_s

    def __call__(self, bus_id: str, period_s: float) -> PmDevice:
        try:
            proc = subprocess.Popen(
                [*self._command, "--bus", bus_id, "--period", repr(period_s)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self._env, start_new_session=True)
        except OSError as e:
            raise PmError("worker_spawn", f"cannot start the PM worker: {e}") from None
        session = _WorkerSession(proc)
        session.wait_ready(self._start_timeout)
        return session


class _WorkerSession:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self.pid: int | None = proc.pid
        assert proc.stdout is not None and proc.stdin is not None
        self._fd = proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._req = proc.stdin.fileno()
        os.set_blocking(self._req, False)
        self._buf = b""

    def _lines(self) -> list[bytes]:
        while True:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [ln for ln in lines if ln.strip()]

    def _died(self, kind: str) -> PmError:
        err = b""
        if self._proc.stderr is not None:
            os.set_blocking(self._proc.stderr.fileno(), False)
            try:
                err = self._proc.stderr.read() or b""
            except (BlockingIOError, OSError):
                err = b""
        return PmError(kind, f"PM worker exited ({self._proc.returncode}): "
                             f"{err.decode(errors='replace').strip()[-300:]}")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            select.select([self._fd], [], [], 0.1)
            for line in self._lines():
                msg = json.loads(line)
                if isinstance(msg, dict) and msg.get("ready"):
                    return
                if isinstance(msg, dict) and "error" in msg:
                    self.close()
                    raise PmError(str(msg["error"]), str(msg.get("detail", "")))
            if self._proc.poll() is not None:
                raise self._died("worker_exited")
        self.close()
        raise PmError("worker_start_timeout", f"PM worker not ready after {timeout_s:.0f} s")

    def _request(self) -> None:
        # A full pipe (requests it has not read yet already ask for a decode) or a closed one
        # (the worker has gone: read() finds out from its exit) needs nothing more here.
        with contextlib.suppress(OSError):
            os.write(self._req, b"\n")

    def read(self) -> list[tuple[int, int, float, float]]:
        self._request()
        out = []
        deadline = time.monotonic() + REPLY_WAIT_S
        answered = False
        while True:
            for line in self._lines():
                try:
                    msg = json.loads(line)
                    if isinstance(msg, dict):
                        if "error" in msg:
                            raise PmError(str(msg["error"]), str(msg.get("detail", "")))
                        answered = answered or "decoded" in msg
                        continue
                    s0, s1, cyc, tensor = msg
                    out.append((int(s0), int(s1), float(cyc), float(tensor)))
                except (ValueError, TypeError) as e:
                    raise PmError("worker_protocol", f"bad line from the PM worker: {e}") from None
            left = deadline - time.monotonic()
            if answered or left <= 0 or self._proc.poll() is not None:
                break
            select.select([self._fd], [], [], left)
        if not out and self._proc.poll() is not None:
            raise self._died("worker_exited")
        return out

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(STOP_GRACE_S)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                # A worker stuck in the driver may not even die at once: never wait on it long.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(STOP_GRACE_S)
        for f in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if f is not None:
                f.close()
