"""Analysis of benchmarks/h100_sharing.py's raw.json (run here or on the GPU machine).

    python3 benchmarks/sharing_analysis.py raw.json

For every scenario: the daemon's formula over the span both workers ran (measured/true), the
same with each interval's time scaled by (1 - context-switch active share), the mean of the
context-switch metrics, and each process's share by NVML per-process SM utilisation against its
true share.
"""

from __future__ import annotations

import json
import sys

SMS = 132
RATE = {"7": 4096, "6": 256, "12": 256, "11": 128, "13": 512}  # H100, FLOPs/clock/SM (bf16 HMMA)


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) else None


def _flops(row: dict) -> float:
    dt = row["t1"] - row["t0"]
    total = 0.0
    for mid, rate in RATE.items():
        act = _num(row["m"].get(mid))
        if act:
            total += act / 100.0 * SMS * rate * row["clock_mhz"] * 1e6 * dt
    return total


def _overlap(row: dict, t0: float, t1: float) -> float:
    return max(0.0, min(row["t1"], t1) - max(row["t0"], t0)) / (row["t1"] - row["t0"])


def report(raw: dict) -> list[dict]:
    rows = raw["intervals"]
    out = []
    print(f"\n{'scenario':<15}{'meas/true':>10}{'ctxsw-corr':>11}{'ctxsw%':>8}{'req/s':>9}"
          f"{'hmma':>7}{'clk':>6}  per-process smUtil share vs true share")
    for sc in raw["scenarios"]:
        ps = sc["processes"]
        t0, t1 = min(p["t0"] for p in ps), max(p["t1"] for p in ps)
        lo, hi = t0 - 0.3, t1 + 0.3
        true = sum(p["flops"] for p in ps)
        meas = corr = 0.0
        pct, req, hm, clk, n = 0.0, 0.0, 0.0, 0.0, 0
        for r in rows:
            w = _overlap(r, lo, hi)
            if w <= 0:
                continue
            f = _flops(r) * w
            meas += f
            cp = _num(r["m"].get("174"))
            corr += f * (1 - (cp or 0.0) / 100.0)
            if r["t0"] >= t0 + 0.5 and r["t1"] <= t1 - 0.5:
                n += 1
                pct += cp or 0.0
                req += (_num(r["m"].get("172")) or 0.0)
                hm += _num(r["m"].get("7")) or 0.0
                clk += r["clock_mhz"]
        n = max(n, 1)
        # per-process SM busy time over the span from NVML's samples (1 s windows ending at ts)
        busy: dict[int, float] = {}
        for _, pid, ts, sm, _mem in raw["process_util"]:
            if t0 - 0.5 <= ts - 0.5 and ts - 0.5 <= t1 + 0.5:
                busy[pid] = busy.get(pid, 0.0) + sm
        tb = sum(busy.get(p["pid"], 0.0) for p in ps) or 1.0
        shares = [
            f"{p['name']}:{busy.get(p['pid'], 0.0) / tb:.2f}/{p['flops'] / true:.2f}" for p in ps
        ]
        res = {"name": sc["name"], "ratio": meas / true, "ratio_ctxsw": corr / true,
               "ctxsw_pct": pct / n, "ctxsw_req": req / n, "hmma": hm / n, "clock": clk / n,
               "shares": shares}
        out.append(res)
        print(f"{sc['name']:<15}{res['ratio']:>10.4f}{res['ratio_ctxsw']:>11.4f}"
              f"{res['ctxsw_pct']:>8.2f}{res['ctxsw_req']:>9.1f}{res['hmma']:>7.1f}"
              f"{res['clock']:>6.0f}  {' '.join(shares)}")
    if any("reasons" in r for r in rows):
        throttle_table(raw)
    sample = rows[len(rows) // 2]["m"]
    print("metric values mid-run:", {k: sample[k] for k in sorted(sample, key=int)})
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        report(json.load(fh))


BITS = {"sw_power_cap": 0x4, "hw_slowdown": 0x8, "sw_thermal": 0x20, "hw_thermal": 0x40,
        "hw_power_brake": 0x80, "idle": 0x1}


def throttle_table(raw: dict) -> None:
    """Per scenario: share of 10 ms reads with each clock-event reason set, and cumulative
    counters' growth per second of the span (ns/s = parts per billion of the time)."""
    rows = raw["intervals"]
    print(f"\n{'scenario':<15}" + "".join(f"{k:>15}" for k in BITS) + "  counters (ms/s)  power W")
    for sc in raw["scenarios"]:
        ps = sc["processes"]
        t0, t1 = min(p["t0"] for p in ps) + 0.5, max(p["t1"] for p in ps) - 0.5
        sel = [r for r in rows if r["t0"] >= t0 and r["t1"] <= t1 and "reasons" in r]
        if len(sel) < 2:
            continue
        reads = [x for r in sel for x in r["reasons"]]
        frac = {k: sum(1 for x in reads if x & b) / max(1, len(reads)) for k, b in BITS.items()}
        a, b = sel[0]["fields"], sel[-1]["fields"]
        span = sel[-1]["t1"] - sel[0]["t1"]
        growth = {k: round((b[k] - a[k]) / span / 1e6, 1) for k in a
                  if isinstance(a[k], int) and isinstance(b.get(k), int) and k != "energy_mj"}
        power = (b.get("energy_mj", 0) - a.get("energy_mj", 0)) / span / 1e3
        print(f"{sc['name']:<15}" + "".join(f"{frac[k]:>15.3f}" for k in BITS)
              + f"  {growth}  {power:.0f}")
