"""Cluster-wide figures for the audit report from the Prometheus HTTP API."""

from __future__ import annotations

import json
import math
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from gpuflops.compliance.reconcile import JobInput


class PrometheusError(RuntimeError):
    """A Prometheus query failed; carries the URL and query."""

    def __init__(self, url: str, query: str, message: str) -> None:
        super().__init__(f"{url}: query {query!r}: {message}")
        self.url = url
        self.query = query


UrlOpen = Callable[[str, float], bytes]


def _urlopen(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: bytes = resp.read()
        return body


class PrometheusSource:
    """Cluster-wide totals from the Prometheus HTTP API (instant and range queries)."""

    def __init__(self, base_url: str, *, timeout_s: float = 30.0,
                 urlopen: UrlOpen = _urlopen) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._urlopen = urlopen
        self.queries: list[str] = []

    def _get(self, path: str, params: Mapping[str, str]) -> Any:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        query = params.get("query", "")
        self.queries.append(query)
        try:
            body = json.loads(self._urlopen(url, self._timeout_s))
        except (OSError, ValueError) as exc:
            raise PrometheusError(self.base_url, query, str(exc)) from exc
        if not isinstance(body, dict) or body.get("status") != "success":
            err = body.get("error") if isinstance(body, dict) else body
            raise PrometheusError(self.base_url, query, f"status not success: {err}")
        return body["data"]

    def query(self, promql: str, at_s: float | None = None) -> list[tuple[dict[str, str], float]]:
        """Instant vector query (at ``at_s``, default now): [(labels, value)]."""
        params = {"query": promql}
        if at_s is not None:
            params["time"] = f"{at_s:.3f}"
        data = self._get("/api/v1/query", params)
        if data.get("resultType") != "vector":
            raise PrometheusError(self.base_url, promql,
                                  f"expected a vector, got {data.get('resultType')}")
        return [(dict(r["metric"]), float(r["value"][1])) for r in data["result"]]

    def matrix(self, promql: str, at_s: float) -> list[tuple[dict[str, str],
                                                            list[tuple[float, float]]]]:
        """A range-vector selector evaluated at ``at_s``: every raw sample of each series."""
        data = self._get("/api/v1/query", {"query": promql, "time": f"{at_s:.3f}"})
        if data.get("resultType") != "matrix":
            raise PrometheusError(self.base_url, promql,
                                  f"expected a matrix, got {data.get('resultType')}")
        return [(dict(r["metric"]), [(float(t), float(v)) for t, v in r["values"]])
                for r in data["result"]]

    def query_range(self, promql: str, start_s: float, end_s: float,
                    step_s: float) -> list[tuple[float, float]]:
        """Range query of a single series (summed): [(t_s, value)]."""
        data = self._get("/api/v1/query_range", {
            "query": promql, "start": f"{start_s:.3f}", "end": f"{end_s:.3f}",
            "step": f"{step_s:.3f}"})
        points: dict[float, float] = {}
        for r in data.get("result", []):
            for t, v in r["values"]:
                points[float(t)] = points.get(float(t), 0.0) + float(v)
        return sorted(points.items())

    def job_inputs(self, program: str,
                   metadata: Mapping[tuple[str, str], Mapping[str, Any]],
                   start_s: float | None = None, end_s: float | None = None) -> list[JobInput]:
        """Per-job sums across all nodes, over [start_s, end_s] (default: the last day).

        Each series' latest value in the window (``max_over_time``): an ended job's series
        leave /metrics after the exporter's job TTL and go stale in Prometheus at once, so an
        instant query would drop them; the job totals are monotonic, so the window's maximum is
        the last total. A job whose series are older than Prometheus's retention is missing
        here; the node ledgers (or the fleet tier) still hold it.

        The half-rate correction: the nodes export the job's census claim and its hardware
        figure, not its HMMA part, so the HMMA part is taken back from them (measured less
        hardware is the half-rate excess, HMMA · f / (1 + f)). That holds where the node
        applied no precision correction (declared and inferred precision agree, the default
        policy's common case); with one, the report's hardware figure for that job is off by
        the correction's share of the excess.
        """
        end = end_s if end_s is not None else time.time()
        start = start_s if start_s is not None else end - 86400.0
        window = f"{max(60, math.ceil(end - start))}s"
        sel = f'{{program="{promql_escape(program)}"}}'
        cols: dict[str, dict[tuple[str, str], float]] = {}
        sums = {name: f"gpuflops_job_{name}_total" for name in (
            "measured_flops", "analytic_flops", "analytic_tokens", "recompute_flops")}
        sums["hardware_flops"] = "gpuflops_job_hardware_flops"
        for name, metric in sums.items():
            q = f"sum by (job_id,program)(max_over_time({metric}{sel}[{window}]))"
            cols[name] = {(lab.get("job_id", ""), lab.get("program", "")): v
                          for lab, v in self.query(q, at_s=end)}
        q = (f"max by (job_id,program)(max_over_time(gpuflops_job_half_rate_fraction{sel}"
             f"[{window}]))")
        half = {(lab.get("job_id", ""), lab.get("program", "")): v
                for lab, v in self.query(q, at_s=end)}
        keys = sorted(set().union(*(cols[n] for n in sums if n != "hardware_flops")))
        out = []
        for key in keys:
            job, prog = key
            measured = cols["measured_flops"].get(key, 0.0)
            f = half.get(key)
            hmma = 0.0
            if f is not None and f > 0 and key in cols["hardware_flops"]:
                excess = max(0.0, measured - cols["hardware_flops"][key])
                hmma = excess * (1.0 + f) / f
            out.append(JobInput(
                job=job, program=prog, measured_flops=measured,
                analytic_flops=cols["analytic_flops"].get(key, 0.0),
                recompute_flops=cols["recompute_flops"].get(key, 0.0),
                tokens=cols["analytic_tokens"].get(key, 0.0),
                metadata=metadata.get(key, {}), hmma_flops=hmma, half_rate_fraction=f))
        return out

    def series(self, program: str, start_s: float, end_s: float,
               max_points: int = 500) -> list[tuple[float, float]]:
        """Cumulative measured FLOPs of the program's jobs over time, aged-out jobs included
        (each job's latest total within the window at every step)."""
        step = max(15.0, (end_s - start_s) / max_points)
        window = f"{max(60, math.ceil(end_s - start_s))}s"
        q = (f'sum(last_over_time(gpuflops_job_measured_flops_total'
             f'{{program="{promql_escape(program)}"}}[{window}]))')
        return self.query_range(q, start_s, end_s, step)


def promql_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
