"""GEMM phases with exact FLOP counts, for accuracy benchmarks on a real GPU.

Usage: python gemm_worker.py OUT.json PHASE[,PHASE...] [--seconds S] [--start-at EPOCH]
                              [--gap S] [--report JOB] [--iters N]

With --iters N each phase instead runs exactly N products inside a CUDA profiler range (for
``ncu --profile-from-start off``) and records their exact FLOPs.

Each phase runs matrix products of one precision and shape for about S seconds and records
[t0, t1] (wall clock, taken after a device synchronisation) and the exact FLOPs issued:
2*m*n*k per product, warm-up products included. Nothing else runs on the GPU in this process.
It also records the time course: (time, FLOPs) after every synchronisation (about 50 ms).

With --report JOB the worker registers JOB (program JOB) on the gpuflops job socket
($GPUFLOPS_SOCKET) and reports those same exact FLOPs through JobReporter as it goes, the way a
training loop's callback reports its analytic estimate.
"""

from __future__ import annotations

import json
import sys
import time

import torch

PHASES = {
    # name: (dtype, m, n, k, pipe the counters should show)
    "bf16": ("bf16", 8192, 8192, 8192),
    "fp16": ("fp16", 8192, 8192, 8192),
    "tf32": ("tf32", 8192, 8192, 8192),
    "fp8": ("fp8", 8192, 8192, 8192),
    "fp64": ("fp64", 4096, 4096, 4096),
    "fp32": ("fp32", 4096, 4096, 4096),
    "bf16_small": ("bf16", 1024, 1024, 1024),
    "bf16_mid": ("bf16", 6144, 6144, 6144),
    "bf16_mlp": ("bf16", 16384, 4096, 4096),
    # A 50257-token vocabulary head: the output's leading dimension is odd, so cuBLAS cannot
    # use Hopper's TMA/wgmma kernels and picks an mma.sync one (half the ops per active cycle).
    "bf16_vocab": ("bf16", 8192, 50257, 1024),
    "bf16_vocab_aligned": ("bf16", 8192, 50304, 1024),
    # Fused attention forward (flash SDPA, non-causal): (batch, heads, seq, head_dim) = m, n, k, 64
    "sdpa": ("sdpa", 8, 16, 2048),
}


def _flops_each(dtype: str, m: int, n: int, k: int) -> int:
    if dtype == "sdpa":  # QK^T and PV: 2 matmuls of 2*s*s*d each per (batch, head)
        return 4 * m * n * k * k * 64
    return 2 * m * n * k


def _operands(dtype: str, m: int, n: int, k: int):  # type: ignore[no-untyped-def]
    dev = "cuda"
    if dtype == "sdpa":
        q, kk, v = (torch.randn(m, n, k, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))

        def attn() -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, kk, v)

        return attn
    if dtype == "fp8":
        a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
        bt = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn)
        one = torch.tensor(1.0, device=dev)

        def mm() -> torch.Tensor:
            return torch._scaled_mm(a, bt.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

        return mm
    torch_dtype = {
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "tf32": torch.float32,
        "fp32": torch.float32,
        "fp64": torch.float64,
    }[dtype]
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    a = torch.randn(m, k, device=dev, dtype=torch_dtype)
    b = torch.randn(k, n, device=dev, dtype=torch_dtype)
    out = torch.empty(m, n, device=dev, dtype=torch_dtype)

    def mm() -> torch.Tensor:
        return torch.matmul(a, b, out=out)

    return mm


def profile_phase(name: str, iters: int) -> dict:
    """Exactly ``iters`` products inside a CUDA profiler range, for ``ncu --profile-from-start off``."""
    dtype, m, n, k = PHASES[name]
    mm = _operands(dtype, m, n, k)
    mm()  # warm-up (and cuBLAS heuristics) outside the range
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(iters):
        mm()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return {"name": name, "dtype": dtype, "shape": [m, n, k], "products": iters,
            "flops": float(_flops_each(dtype, m, n, k)) * iters}


def run_phase(name: str, seconds: float, reporter=None) -> dict:  # type: ignore[no-untyped-def]
    dtype, m, n, k = PHASES[name]
    mm = _operands(dtype, m, n, k)
    torch.cuda.synchronize()
    flops_each = _flops_each(dtype, m, n, k)
    count = 0
    t0 = time.time()
    # Size a batch so a synchronisation happens about every 50 ms.
    batch = 1
    series = []
    while True:
        for _ in range(batch):
            mm()
        torch.cuda.synchronize()
        count += batch
        done = float(flops_each) * batch
        series.append((time.time(), done))
        if reporter is not None:
            reporter.add(done)
        elapsed = time.time() - t0
        if elapsed >= seconds:
            break
        if elapsed < 0.05 * count / batch:
            batch = min(batch * 2, 4096)
    t1 = time.time()
    return {
        "name": name,
        "dtype": dtype,
        "shape": [m, n, k],
        "t0": t0,
        "t1": t1,
        "products": count,
        "flops": float(flops_each) * count,
        "tflops_per_s": flops_each * count / (t1 - t0) / 1e12,
        "pid": __import__("os").getpid(),
        "series": series,
        "reported": reporter is not None,
    }


def main() -> None:
    out = sys.argv[1]
    names = sys.argv[2].split(",")
    seconds = 8.0
    start_at = None
    gap = 2.0
    job = None
    iters = None
    args = sys.argv[3:]
    while args:
        flag = args.pop(0)
        if flag == "--seconds":
            seconds = float(args.pop(0))
        elif flag == "--start-at":
            start_at = float(args.pop(0))
        elif flag == "--gap":
            gap = float(args.pop(0))
        elif flag == "--report":
            job = args.pop(0)
        elif flag == "--iters":
            iters = int(args.pop(0))
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    if iters is not None:
        with open(out, "w") as f:
            json.dump([profile_phase(name, iters) for name in names], f, indent=1)
        return
    # Allocate operands ahead so allocation never lands inside a timed window.
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    reporter = None
    if job is not None:
        from gpuflops.client.reporter import JobReporter

        reporter = JobReporter(job, job, precision=PHASES[names[0]][0])
    results = []
    for name in names:
        results.append(run_phase(name, seconds, reporter))
        if reporter is not None:
            reporter.flush(2.0)
        time.sleep(gap)  # idle padding: the counters must read exactly zero work here
    if reporter is not None:
        reporter.close()
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
