"""``JobReporter``: report a training job's analytic FLOPs and tokens to the gpuflops daemon.

The training thread only adds numbers to running sums under a lock (``add()`` takes about a
microsecond and never blocks on I/O or raises). A background thread moves the sums into a bounded
queue every ``flush_interval_s``, (re)connects, registers the job and delivers the queue as batched
``add`` messages with a sequence number, so a batch re-sent after a lost reply is not counted
twice. Without a daemon nothing is lost while the process runs (when the queue is full, new
intervals are merged into the newest entry: totals are kept, only time resolution is lost); what
cannot be delivered by ``close()`` or is refused by the daemon is counted and logged as dropped.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from gpuflops.client.metadata import env_int, validated_metadata
from gpuflops.config import DEFAULT_SOCKET_PATH
from gpuflops.jobs import protocol
from gpuflops.jobs.protocol import ErrorCode, Increment, ProtocolError

MAX_ITEMS_PER_MESSAGE = 256  # keeps one add message far below the 64 KiB limit
# Errors after which a batch can never be accepted: drop it (counted) instead of retrying forever.
_PERMANENT = frozenset({ErrorCode.FORBIDDEN, ErrorCode.JOB_ENDED, ErrorCode.BAD_FIELD,
                        ErrorCode.CONFLICT, ErrorCode.BAD_VERSION, ErrorCode.BAD_OP,
                        ErrorCode.BOUND})


@dataclass(frozen=True)
class ReporterStats:
    """What the reporter accepted, delivered, still holds and dropped (FLOPs, tokens, adds)."""

    adds: int  # add() calls accepted
    invalid_adds: int  # add() calls refused locally (negative, NaN, not a number)
    delivered_flops: float
    delivered_tokens: float
    delivered_recompute_flops: float
    delivered_adds: int
    pending_flops: float
    pending_adds: int
    dropped_flops: float
    dropped_tokens: float
    dropped_recompute_flops: float
    dropped_adds: int
    merged_intervals: int  # intervals folded into the newest queue entry because it was full
    connected: bool
    connects: int
    last_error: str | None


class JobReporter:
    """Context manager that registers a job with the daemon and streams analytic estimates."""

    def __init__(
        self,
        job: str | None = None,
        program: str | None = None,
        model: str | None = None,
        params: int | None = None,
        precision: str | None = None,
        *,
        socket_path: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
        flush_interval_s: float = 0.5,
        max_pending: int = 4096,
        reconnect_max_s: float = 10.0,
        io_timeout_s: float = 2.0,
        close_timeout_s: float = 5.0,
        environ: Mapping[str, str] | None = None,
        logger: logging.Logger | None = None,
        **more_metadata: Any,
    ) -> None:
        env = os.environ if environ is None else environ
        self._log = logger or logging.getLogger("gpuflops.client")
        self.socket_path = socket_path or env.get("GPUFLOPS_SOCKET") or DEFAULT_SOCKET_PATH
        self._flush_interval_s = flush_interval_s
        self._max_pending = max(1, max_pending)
        self._reconnect_max_s = reconnect_max_s
        self._io_timeout_s = io_timeout_s
        self._close_timeout_s = close_timeout_s
        self.client_id = secrets.token_hex(8)
        self.disabled_reason: str | None = None

        job = job or env.get("GPUFLOPS_JOB")
        program = program or env.get("GPUFLOPS_PROGRAM")
        if job is None:
            job = f"adhoc-{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
            job = "".join(c if c.isalnum() or c in "._-" else "-" for c in job)[:128]
            self._log.warning("gpuflops: no job id given or in GPUFLOPS_JOB; using %s", job)
        if program is None:
            program = "unassigned"
            self._log.warning("gpuflops: no program given or in GPUFLOPS_PROGRAM; using %s",
                              program)
        self.job, self.program = job, program
        for name, value in (("job", job), ("program", program)):
            try:
                protocol.check_id(name, value)
            except ProtocolError as exc:
                self.disabled_reason = exc.detail
                self._log.error("gpuflops: reporter disabled, invalid %s", exc.detail)

        given: dict[str, Any] = {
            "model": model,
            "params_total": params,
            "precision": precision,
            "rank": rank if rank is not None else env_int(env, "RANK"),
            "world_size": world_size if world_size is not None else env_int(env, "WORLD_SIZE"),
            "local_rank": local_rank if local_rank is not None else env_int(env, "LOCAL_RANK"),
            "node": socket.gethostname(),
        }
        extra: dict[str, Any] = dict(more_metadata.pop("extra", None) or {})
        for name, value in more_metadata.items():
            if name in protocol.METADATA_FIELDS:
                given[name] = value
            else:
                extra[name] = value
        self.metadata = validated_metadata(given, extra, self._log)
        self.rank: int | None = self.metadata.get("rank")

        self._lock = threading.Lock()
        self._acc = [0.0, 0.0, 0.0, 0]  # flops, tokens, recompute_flops, adds since last move
        self._adds = 0
        self._invalid = 0
        self._warned_invalid = False
        # Everything below is owned by the sender thread; stats() reads it under _lock.
        self._pending: deque[Increment] = deque()
        self._claims: dict[str, dict[str, Any]] = {}  # kind -> newest unsent claim message
        self._inflight: tuple[tuple[Increment, ...], int] | None = None
        self._seq = 0
        self._delivered = [0.0, 0.0, 0.0, 0]
        self._dropped = [0.0, 0.0, 0.0, 0]
        self._merged = 0
        self._sock: socket.socket | None = None
        self._rbuf = b""
        self._connects = 0
        self._failures = 0
        self._last_error: str | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._end_status = "completed"
        self._exit_code: int | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.disabled_reason is None:
            self._thread = threading.Thread(
                target=self._run, name="gpuflops-reporter", daemon=True
            )
            self._thread.start()
            atexit.register(self._at_exit)

    # -- training-thread API ---------------------------------------------------------------

    def add(self, flops: float, tokens: float = 0.0, recompute_flops: float = 0.0) -> None:
        """Record analytic work; never blocks on I/O and never raises."""
        try:
            if (
                0.0 <= flops <= protocol.MAX_FLOAT
                and 0.0 <= tokens <= protocol.MAX_FLOAT
                and 0.0 <= recompute_flops <= protocol.MAX_FLOAT
            ):
                with self._lock:
                    acc = self._acc
                    acc[0] += flops
                    acc[1] += tokens
                    acc[2] += recompute_flops
                    acc[3] += 1
                    self._adds += 1
                return
        except Exception:  # not a number (a tensor on another device, None, ...)
            pass
        self._invalid_add(flops, tokens, recompute_flops)

    def _invalid_add(self, *values: object) -> None:
        with self._lock:
            self._invalid += 1
            first = not self._warned_invalid
            self._warned_invalid = True
        if first:
            self._log.warning(
                "gpuflops: dropped add(%s): values must be finite numbers >= 0 (counted in "
                "stats().invalid_adds; further ones are logged at debug)",
                ", ".join(repr(v)[:40] for v in values),
            )
        else:
            self._log.debug("gpuflops: dropped invalid add(%r)", values)

    def stats(self) -> ReporterStats:
        """Counters: accepted, delivered, pending, dropped."""
        with self._lock:
            pending = [*self._pending, *(self._inflight[0] if self._inflight else ())]
            return ReporterStats(
                adds=self._adds,
                invalid_adds=self._invalid,
                delivered_flops=self._delivered[0],
                delivered_tokens=self._delivered[1],
                delivered_recompute_flops=self._delivered[2],
                delivered_adds=int(self._delivered[3]),
                pending_flops=self._acc[0] + sum(i.flops for i in pending),
                pending_adds=int(self._acc[3]) + sum(i.adds for i in pending),
                dropped_flops=self._dropped[0],
                dropped_tokens=self._dropped[1],
                dropped_recompute_flops=self._dropped[2],
                dropped_adds=int(self._dropped[3]),
                merged_intervals=self._merged,
                connected=self._sock is not None,
                connects=self._connects,
                last_error=self._last_error,
            )

    def claim(self, kind: str, value: float, *, sampled_steps: int,
              evidence: str | None = None) -> None:
        """Tell the daemon something about this job's own work (a kernel census: protocol
        ``claim``). Sent before the next estimates; the latest claim of a kind counts."""
        msg = {"v": 1, "op": "claim", "job": self.job, "kind": kind, "value": float(value),
               "sampled_steps": int(sampled_steps), **({"evidence": evidence[:256]} if evidence
                                                      else {})}
        with self._lock:
            self._claims[kind] = msg
        self._wake.set()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait up to ``timeout_s`` until everything added so far is delivered; True if it was."""
        if self._thread is None:
            return False
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._acc[3] or self._pending or self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._wake.set()
                self._idle.wait(min(remaining, 0.05))
        return True

    def close(self, status: str | None = None, exit_code: int | None = None) -> ReporterStats:
        """Deliver what is pending (bounded by close_timeout_s), end this rank, stop the thread."""
        if not self._closed:
            self._closed = True
            if status is not None:
                self._end_status = status
            self._exit_code = exit_code
            self._closing.set()
            self._wake.set()
            if self._thread is not None:
                self._thread.join(self._close_timeout_s + self._io_timeout_s + 1.0)
                atexit.unregister(self._at_exit)
            else:
                self._drop_all(f"reporter disabled: {self.disabled_reason}")
        return self.stats()

    def _at_exit(self) -> None:
        self._close_timeout_s = min(self._close_timeout_s, 2.0)
        self.close(status="exited")

    def __enter__(self) -> JobReporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close(status="completed", exit_code=0)
        else:
            self.close(status=f"failed: {exc_type.__name__}", exit_code=1)

    # -- sender thread ---------------------------------------------------------------------

    def _run(self) -> None:
        backoff_s = 0.1
        next_connect = 0.0
        while True:
            closing = self._closing.is_set()
            if not closing:
                self._wake.wait(self._flush_interval_s)
                self._wake.clear()
                closing = self._closing.is_set()
            try:
                self._move_accumulated()
                if self._sock is None and (closing or time.monotonic() >= next_connect):
                    if self._connect():
                        backoff_s = 0.1
                    else:
                        next_connect = time.monotonic() + backoff_s
                        backoff_s = min(backoff_s * 2, self._reconnect_max_s)
                if self._sock is not None:
                    self._deliver(deadline=time.monotonic() + self._close_timeout_s)
            except Exception as exc:  # never let the thread die silently
                self._disconnect(f"reporter error: {exc!r}")
            with self._lock:
                self._idle.notify_all()
            if closing:
                self._finish()
                return

    def _move_accumulated(self) -> None:
        with self._lock:
            flops, tokens, recompute, count = self._acc
            if not count:
                return
            self._acc = [0.0, 0.0, 0.0, 0]
            item = Increment(flops, tokens, recompute, int(count))
            if len(self._pending) >= self._max_pending:
                last = self._pending.pop()
                item = Increment(
                    last.flops + flops,
                    last.tokens + tokens,
                    last.recompute_flops + recompute,
                    last.adds + item.adds,
                )
                self._merged += 1
            self._pending.append(item)

    def _connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._io_timeout_s)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            self._note_failure(f"cannot connect to {self.socket_path}: {exc.strerror or exc}")
            return False
        with self._lock:
            self._sock = sock
        self._rbuf = b""
        reply = self._request(
            {"v": 1, "op": "register", "job": self.job, "program": self.program,
             "client": self.client_id, **self.metadata}
        )
        if reply is None:
            return False
        if not reply.get("ok"):
            code, detail = reply.get("error"), reply.get("detail")
            self._disconnect(f"register refused: {code}: {detail}")
            if code in _PERMANENT:
                self._log.error("gpuflops: daemon refused job %s (%s: %s); reporting stops",
                                self.job, code, detail)
                self._drop_all(f"register refused ({code})")
                self._closing.set()
            return False
        self._connects += 1
        if self._failures:
            self._log.info("gpuflops: connected to %s after %d failed attempts",
                           self.socket_path, self._failures)
        self._failures = 0
        if reply.get("conflicts"):
            self._log.warning("gpuflops: job %s metadata disagrees with an earlier register on %s",
                              self.job, ", ".join(map(str, reply["conflicts"])))
        return True

    def _deliver(self, deadline: float) -> None:
        with self._lock:
            claims = list(self._claims.values())
        for msg in claims:
            reply = self._request(msg)
            if reply is None:
                return  # connection lost: sent again after reconnecting
            with self._lock:  # a newer claim of the kind may have come meanwhile: keep that
                if self._claims.get(msg["kind"]) is msg:
                    del self._claims[msg["kind"]]
            if not reply.get("ok"):
                self._log.warning("gpuflops: claim %s refused: %s: %s", msg["kind"],
                                  reply.get("error"), reply.get("detail"))
        while self._sock is not None and time.monotonic() < deadline:
            with self._lock:
                if self._inflight is None:
                    if not self._pending:
                        return
                    n = min(len(self._pending), MAX_ITEMS_PER_MESSAGE)
                    items = tuple(self._pending.popleft() for _ in range(n))
                    self._seq += 1
                    self._inflight = (items, self._seq)
                items, seq = self._inflight
            reply = self._request(
                {"v": 1, "op": "add", "job": self.job, "client": self.client_id, "seq": seq,
                 "items": [{"flops": i.flops, "tokens": i.tokens,
                            "recompute_flops": i.recompute_flops, "adds": i.adds}
                           for i in items]}
            )
            if reply is None:
                return  # connection lost: the same batch and seq are re-sent after reconnecting
            if reply.get("ok"):
                with self._lock:
                    self._inflight = None
                    for i in items:
                        self._delivered[0] += i.flops
                        self._delivered[1] += i.tokens
                        self._delivered[2] += i.recompute_flops
                        self._delivered[3] += i.adds
                continue
            code, detail = reply.get("error"), reply.get("detail")
            if code == ErrorCode.UNKNOWN_JOB:
                self._disconnect("daemon forgot the job (restarted?); re-registering")
                return
            if code in _PERMANENT:
                with self._lock:
                    self._inflight = None
                self._drop(items, f"daemon refused: {code}: {detail}")
                continue
            self._disconnect(f"daemon answered {code}: {detail}; will retry")
            return

    def _request(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        sock = self._sock
        if sock is None:
            return None
        try:
            sock.sendall(protocol.encode(msg))
            while b"\n" not in self._rbuf:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("daemon closed the connection")
                self._rbuf += data
            line, self._rbuf = self._rbuf.split(b"\n", 1)
            reply = protocol.decode(line)
        except (OSError, ValueError, ProtocolError) as exc:
            self._disconnect(f"lost connection to {self.socket_path}: {exc}")
            return None
        return reply

    def _disconnect(self, why: str, failure: bool = True) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if failure:
            self._note_failure(why)

    def _note_failure(self, why: str) -> None:
        self._failures += 1
        self._last_error = why
        if self._failures == 1 and self._connects == 0:
            self._log.warning(
                "gpuflops: %s; buffering analytic FLOPs for job %s and retrying in the background",
                why, self.job,
            )
        elif self._failures == 1:
            self._log.warning("gpuflops: %s; buffering and reconnecting", why)
        else:
            self._log.debug("gpuflops: %s", why)

    def _drop(self, items: tuple[Increment, ...], why: str) -> None:
        if not items:
            return
        with self._lock:
            for i in items:
                self._dropped[0] += i.flops
                self._dropped[1] += i.tokens
                self._dropped[2] += i.recompute_flops
                self._dropped[3] += i.adds
        self._log.warning(
            "gpuflops: dropped %.6g FLOPs, %.6g tokens, %.6g recompute FLOPs from %d adds of job "
            "%s: %s", sum(i.flops for i in items), sum(i.tokens for i in items),
            sum(i.recompute_flops for i in items), sum(i.adds for i in items), self.job, why,
        )

    def _drop_all(self, why: str) -> None:
        self._move_accumulated()
        with self._lock:
            items = (*(self._inflight[0] if self._inflight else ()), *self._pending)
            self._inflight = None
            self._pending.clear()
        self._drop(items, why)

    def _finish(self) -> None:
        self._move_accumulated()
        if self._pending or self._inflight:
            self._drop_all(f"daemon unreachable at close ({self._last_error})")
        if self._sock is not None:
            end: dict[str, Any] = {"v": 1, "op": "end", "job": self.job, "status": self._end_status}
            if self.rank is not None:
                end["rank"] = self.rank
            if self._exit_code is not None:
                end["exit_code"] = self._exit_code
            reply = self._request(end)
            if reply is not None and not reply.get("ok"):
                self._log.debug("gpuflops: end refused: %s", reply.get("detail"))
            self._disconnect("closed", failure=False)
        with self._lock:
            self._idle.notify_all()

