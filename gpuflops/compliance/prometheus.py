"""Cluster-wide figures for the audit report from the Prometheus HTTP API."""

from __future__ import annotations

import json
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

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """Instant vector query: [(labels, value)]."""
        data = self._get("/api/v1/query", {"query": promql})
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
                   metadata: Mapping[tuple[str, str], Mapping[str, Any]]) -> list[JobInput]:
        """Per-job sums across all nodes."""
        sel = f'{{program="{promql_escape(program)}"}}'
        cols: dict[str, dict[tuple[str, str], float]] = {}
        for name in ("measured_flops", "analytic_flops", "analytic_tokens", "recompute_flops"):
            q = f"sum by (job_id,program)(gpuflops_job_{name}_total{sel})"
            cols[name] = {(lab.get("job_id", ""), lab.get("program", "")): v
                          for lab, v in self.query(q)}
        keys = sorted(set().union(*cols.values()))
        return [JobInput(
            job=job, program=prog, measured_flops=cols["measured_flops"].get((job, prog), 0.0),
            analytic_flops=cols["analytic_flops"].get((job, prog), 0.0),
            recompute_flops=cols["recompute_flops"].get((job, prog), 0.0),
            tokens=cols["analytic_tokens"].get((job, prog), 0.0),
            metadata=metadata.get((job, prog), {})) for job, prog in keys]

    def series(self, program: str, start_s: float, end_s: float,
               max_points: int = 500) -> list[tuple[float, float]]:
        step = max(15.0, (end_s - start_s) / max_points)
        q = (f'sum(gpuflops_job_measured_flops_total{{program="{promql_escape(program)}"}})')
        return self.query_range(q, start_s, end_s, step)


def promql_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
