"""Real-training accuracy suite: Hugging Face Trainer jobs metered by the daemon at its defaults.

Run on a two-GPU H200 machine from the repository root (cupti-python carried as wheels):

    PYTHONPATH=.:/tmp/site python3 benchmarks/real_training.py --out $OUT --phase metered
    PYTHONPATH=.:/tmp/site python3 benchmarks/real_training.py --out $OUT --phase executed
    python3 benchmarks/real_training.py --combine DIR... --gpu h200 --run 22   # anywhere

Every job is built from a config (no downloads), trains with bf16 autocast as a new user's
Trainer job would (``bf16=True``), and publishes its analytic estimate through the HF callback.
Jobs run one per GPU at a time; the DDP job takes two GPUs (skipped on a one-GPU machine).

Three figures per job, against two truths:
- ``measured``: the daemon's hardware figure for the job (``gpuflops_job_measured_flops``);
- ``analytic``: what the HF callback reported (recomputation included);
- ``compliance``: the program's figure under the default compliance basis;
- ``truth_nominal``: ``FlopCounterMode`` on the meta device for one micro-batch, times the
  micro-batches the job ran, without activation recomputation (``truth_nominal_recompute`` is
  the recomputation that checkpointing adds);
- ``truth_executed``: Nsight Compute's executed tensor ops (``sm__ops_path_tensor_*``) plus
  FP32/FP16 pipe FLOPs (2·FFMA + FADD + FMUL per thread, same for half) over one profiled
  optimizer step after warm-up, times the optimizer steps the metered run did.

The ``metered`` phase runs the daemon and the jobs; the ``executed`` phase runs each job once
more under ncu (the daemon is stopped: PM sampling and ncu exclude each other). ``--combine``
joins them into ``real-training-<gpu>-<run>.json`` with a list ``jobs`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SEQ = 1024
WARMUP_STEPS = 4  # the executed phase profiles the step after these


@dataclass(frozen=True)
class JobSpec:
    arch: str  # llama | gpt2
    vocab: int
    attn: str  # sdpa | eager
    method: str  # full | lora
    ckpt: bool
    world: int = 1
    steps: int = 300
    batch: int = 8
    layers: int = 12
    hidden: int = 1024


JOBS: dict[str, JobSpec] = {
    "llama-v32000-sdpa-full": JobSpec("llama", 32000, "sdpa", "full", False),
    "llama-v32001-sdpa-full": JobSpec("llama", 32001, "sdpa", "full", False),
    "llama-v32000-eager-full": JobSpec("llama", 32000, "eager", "full", False),
    "llama-v32000-sdpa-lora": JobSpec("llama", 32000, "sdpa", "lora", False),
    "llama-v32000-sdpa-full-ckpt": JobSpec("llama", 32000, "sdpa", "full", True),
    "gpt2-v50257-sdpa-full": JobSpec("gpt2", 50257, "sdpa", "full", False, hidden=768),
    "gpt2-v50257-eager-lora-ckpt": JobSpec("gpt2", 50257, "eager", "lora", True, hidden=768),
    "llama-v32000-sdpa-full-ddp": JobSpec("llama", 32000, "sdpa", "full", False, world=2),
}

NCU_OPS = [
    "sm__ops_path_tensor_src_bf16_dst_fp32.sum",
    "sm__ops_path_tensor_src_fp16.sum",
    "sm__ops_path_tensor_src_tf32_dst_fp32.sum",
    "sm__ops_path_tensor_src_fp8.sum",
]
NCU_FP = {  # per-thread instructions and the FLOPs each is worth
    "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum": 2,
    "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum": 1,
    "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum": 1,
    "smsp__sass_thread_inst_executed_op_hfma_pred_on.sum": 2,
    "smsp__sass_thread_inst_executed_op_hadd_pred_on.sum": 1,
    "smsp__sass_thread_inst_executed_op_hmul_pred_on.sum": 1,
}
NCU_CYCLES = "sm__pipe_tensor_cycles_active.sum"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- the job itself


def build_model(spec: JobSpec) -> Any:
    import transformers

    if spec.arch == "llama":
        cfg: Any = transformers.LlamaConfig(
            hidden_size=spec.hidden, intermediate_size=int(spec.hidden * 2.75),
            num_hidden_layers=spec.layers, num_attention_heads=spec.hidden // 64,
            # no GQA: torch 2.11's FlopCounterMode rejects SDPA with fewer KV heads than heads
            num_key_value_heads=spec.hidden // 64, vocab_size=spec.vocab,
            max_position_embeddings=SEQ, tie_word_embeddings=False)
        lora_targets = ["q_proj", "v_proj"]
    else:
        cfg = transformers.GPT2Config(n_embd=spec.hidden, n_layer=spec.layers,
                                      n_head=spec.hidden // 64, n_positions=SEQ,
                                      vocab_size=spec.vocab)
        lora_targets = ["c_attn"]
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=spec.attn)
    if spec.method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=16, lora_alpha=32, target_modules=lora_targets, lora_dropout=0.0,
            fan_in_fan_out=spec.arch == "gpt2"))
    if spec.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def nominal(spec: JobSpec) -> dict[str, float]:
    """FlopCounterMode on the meta device: one micro-batch, with and without recomputation."""
    import torch
    from transformers import masking_utils

    from gpuflops.estimate.exact import FlopCount

    # Looking for packed sequences reads a tensor's value, which meta tensors do not have; the
    # suite's batches are never packed, and the answer changes no FLOP.
    masking_utils.find_packed_sequence_indices = lambda *_a, **_k: None
    out = {}
    for ckpt in sorted({False, spec.ckpt}):
        with torch.device("meta"):
            model = build_model(JobSpec(**{**asdict(spec), "ckpt": ckpt}))
            model.train()
            ids = torch.randint(0, spec.vocab, (spec.batch, SEQ))
        with FlopCount() as c:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        assert c.result is not None
        out["with_ckpt" if ckpt else "plain"] = c.result.total
    per_mb = out["plain"]
    recompute = out.get("with_ckpt", per_mb) - per_mb
    return {"per_micro_batch": per_mb, "recompute_per_micro_batch": recompute}


class _Data:
    def __init__(self, n: int, vocab: int) -> None:
        import torch

        self.ids = torch.randint(0, vocab, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.ids[i]}


def run_job(name: str, mode: str, out: Path, socket_path: str | None) -> None:
    """One job in this process (a torchrun rank for DDP). ``mode``: metered | executed."""
    import torch
    import transformers

    spec = JOBS[name]
    if os.environ.get("SUITE_TINY"):  # a CPU smoke test of this script's own plumbing
        spec = JobSpec(**{**asdict(spec), "layers": 2, "hidden": 128, "steps": 3, "batch": 2})
    rank = int(os.environ.get("RANK", "0"))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    torch.manual_seed(0)
    model = build_model(spec)

    class ProfileOneStep(transformers.TrainerCallback):
        """cudaProfilerStart/Stop around the optimizer step after the warm-up, then stop."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == WARMUP_STEPS:
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.global_step == WARMUP_STEPS + 1:
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
                control.should_training_stop = True
            return control

    callbacks: list[Any] = []
    gcb = None
    if mode == "metered":
        from gpuflops.client.hf import GpuflopsCallback

        gcb = GpuflopsCallback(job=name, program=name, socket_path=socket_path)
        callbacks.append(gcb)
    else:
        callbacks.append(ProfileOneStep())
    steps = spec.steps if mode == "metered" else WARMUP_STEPS + 2
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=spec.batch,
            gradient_accumulation_steps=1, learning_rate=1e-4, bf16=True, report_to=[],
            save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=1, ddp_find_unused_parameters=False,
            use_cpu=not torch.cuda.is_available())
        trainer = transformers.Trainer(model=model, args=args,
                                       train_dataset=_Data(spec.batch * steps * spec.world + 64,
                                                           spec.vocab),
                                       callbacks=callbacks)
        sync()
        t0 = time.time()
        result = trainer.train()
        sync()
        t1 = time.time()
    rec: dict[str, Any] = {"name": name, "rank": rank, "t0": t0, "t1": t1,
                           "steps": int(result.global_step), "pid": os.getpid(),
                           "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                           else "cpu"}
    if gcb is not None:
        rec["callback_flops"] = sum(s.flops for s in gcb.steps)
        rec["callback_recompute"] = sum(s.recompute for s in gcb.steps)
        rec["callback_steps"] = len(gcb.steps)
        rec["declared_precision"] = gcb.metadata.get("precision")
        if gcb.census is not None:
            c = gcb.census
            rec["census"] = {"half_rate_flops": c.half_rate_flops, "matmul_flops": c.matmul_flops,
                             "linked_ops": c.linked_ops, "kernels": c.kernels}
    (out / f"{name}.{mode}.rank{rank}.json").write_text(json.dumps(rec))


# ---------------------------------------------------------------- orchestration


def _env(gpus: str) -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus, PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _job_cmd(name: str, mode: str, out: Path, sock: str | None) -> list[str]:
    me = [str(Path(__file__).resolve()), "--run-job", name, "--mode", mode, "--out", str(out)]
    if sock:
        me += ["--socket", sock]
    if JOBS[name].world > 1:
        return [PY, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={JOBS[name].world}", *me]
    return [PY, *me]


def _gpu_count() -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def _batches(names: list[str]) -> Iterator[list[tuple[str, str]]]:
    """(job, CUDA_VISIBLE_DEVICES) groups that run at once: one single-GPU job per GPU, DDP
    alone; a DDP job wider than the machine is skipped (said in the log)."""
    ngpu = _gpu_count()
    singles = [n for n in names if JOBS[n].world == 1]
    for i in range(0, len(singles), ngpu):
        yield [(n, str(g)) for g, n in enumerate(singles[i:i + ngpu])]
    for n in names:
        if JOBS[n].world > ngpu:
            log(f"{n} needs {JOBS[n].world} GPUs, this machine has {ngpu}: skipped")
        elif JOBS[n].world > 1:
            yield [(n, ",".join(str(g) for g in range(JOBS[n].world)))]


def _metrics(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _pick(m: dict[str, dict[Any, float]], name: str, **want: str) -> float | None:
    total, found = 0.0, False
    for labels, v in m.get(name, {}).items():
        lab = dict(labels)
        lab.setdefault("job", lab.get("job_id", ""))
        if all(lab.get(k) == val for k, val in want.items()):
            total, found = total + v, True
    return total if found else None


def phase_metered(out: Path, names: list[str]) -> None:
    state = Path(tempfile.mkdtemp(prefix="gpuflops-state-"))
    sock = str(state / "jobs.sock")
    port = 9461
    daemon_log = (out / "daemon.log").open("w")
    denv = _env(os.environ.get("CUDA_VISIBLE_DEVICES", "0,1"))
    if os.environ.get("SUITE_DAEMON_LD_LIBRARY_PATH"):  # the CUPTI build cupti-python wants
        denv["LD_LIBRARY_PATH"] = os.environ["SUITE_DAEMON_LD_LIBRARY_PATH"]
    url = f"http://127.0.0.1:{port}/metrics"
    # Programs are re-evaluated every second rather than every 10 s, so each batch's compliance
    # figure is in /metrics soon after it ends; the figure itself does not depend on this.
    refresh_s = 1.0
    cfg = state / "daemon.toml"
    cfg.write_text(f"[daemon]\nprogram_refresh_s = {refresh_s}\n")

    def start(*extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [PY, "-m", "gpuflops", "daemon", "--listen", f"127.0.0.1:{port}", "--socket", sock,
             "--state-dir", str(state), "--config", str(cfg),
             *os.environ.get("SUITE_DAEMON_ARGS", "").split(), *extra],
            stdout=daemon_log, stderr=subprocess.STDOUT, env=denv, cwd=ROOT)
        for _ in range(120):
            if proc.poll() is not None:
                break
            try:
                _metrics(url)
                if Path(sock).exists():
                    break
            except OSError:
                pass
            time.sleep(0.5)
        return proc

    daemon = start()
    if daemon.poll() is not None:  # record what NVML's clock alone gives rather than nothing
        log(f"daemon exited ({daemon.returncode}); restarting it with --counters nvml")
        daemon = start("--counters", "nvml")
    log(f"daemon up (pid {daemon.pid})")
    pipes: dict[str, dict[str, float]] = {}
    figures: dict[str, dict[str, Any]] = {}
    try:
        for batch in _batches(names):
            if daemon.poll() is not None:
                log(f"daemon died ({daemon.returncode}); restarting it with --counters nvml")
                daemon = start("--counters", "nvml")
            before = _metrics(url).get("gpuflops_gpu_flops_total", {})
            procs = []
            for name, gpus in batch:
                log(f"metered: {name} on GPU {gpus}")
                procs.append((name, subprocess.Popen(
                    _job_cmd(name, "metered", out, sock), env=_env(gpus), cwd=ROOT,
                    stdout=(out / f"{name}.metered.log").open("w"), stderr=subprocess.STDOUT)))
            for name, p in procs:
                rc = p.wait()
                log(f"metered: {name} exit {rc}")
            time.sleep(5)  # the attribution hold (3 s) and the ledger commit
            after = _metrics(url).get("gpuflops_gpu_flops_total", {})
            for name, gpus in batch:  # one job per GPU at a time: the GPU's delta is the job's
                d: dict[str, float] = {}
                for labels, v in after.items():
                    lab = dict(labels)
                    if lab["gpu"] in gpus.split(","):
                        k = f"{lab['pipe']}:{lab['precision']}"
                        d[k] = d.get(k, 0.0) + v - before.get(labels, 0.0)
                pipes[name] = d
            # Written after every batch, so a run cut short keeps what it measured.
            time.sleep(max(2.0, refresh_s + 1.0))
            m = _metrics(url)
            for name, _gpus in batch:
                figures[name] = {
                    "measured": _pick(m, "gpuflops_job_measured_flops_total", job=name),
                    "analytic": _pick(m, "gpuflops_job_analytic_flops_total", job=name),
                    "recompute": _pick(m, "gpuflops_job_recompute_flops_total", job=name),
                    "compliance": _pick(m, "gpuflops_program_flops_total", program=name,
                                        basis="compliance"),
                    "hardware": _pick(m, "gpuflops_job_hardware_flops", job=name),
                    "half_rate_fraction": _pick(m, "gpuflops_job_half_rate_fraction", job=name),
                    "band": _pick(m, "gpuflops_program_compliance_band_ratio", program=name),
                    "gpu_pipes": pipes.get(name, {}),
                }
            (out / "metered.json").write_text(json.dumps(figures, indent=1))
            (out / "metrics-final.json").write_text(json.dumps(
                {k: [[list(map(list, lab)), v] for lab, v in d.items()] for k, d in m.items()
                 if k.startswith(("gpuflops_job", "gpuflops_program", "gpuflops_gpu_counter",
                                  "gpuflops_sampler"))}))
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        daemon_log.close()
        subprocess.run([PY, "-m", "gpuflops", "verify", "--state-dir", str(state)],
                       env=_env(""), cwd=ROOT)
        for f in state.glob("ledger.sqlite3*"):
            shutil.copy(f, out / f.name)


def _ncu_rows(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    head, body = rows[0], rows[2:]
    out = []
    for r in body:
        rec: dict[str, Any] = {"kernel": r[head.index("Kernel Name")],
                               "pid": r[head.index("Process ID")]}
        for col in (*NCU_OPS, *NCU_FP, NCU_CYCLES):
            try:
                rec[col] = float(r[head.index(col)].replace(",", ""))
            except (ValueError, IndexError):
                rec[col] = 0.0
        out.append(rec)
    return out


# Kernels that use the tensor pipes: cuBLAS (nvjet, xmma, cutlass), cuDNN and flash attention.
_TENSOR_NAMES = "(nvjet|gemm|xmma|cutlass|sdpa|flash|fmha|attention|wgmma)"
TENSOR_KERNELS = f"regex:^(?!nccl).*{_TENSOR_NAMES}"
# Every other kernel but NCCL's (the "rest" phase): whether any of them uses the tensor pipes.
REST_KERNELS = f"regex:^(?!nccl)(?!.*{_TENSOR_NAMES}).*"


def phase_executed(out: Path, names: list[str], budget_s: float, *,
                   kernel_filter: str = TENSOR_KERNELS, suffix: str = "executed",
                   batch_s: float = 170.0, cycles_only: bool = False,
                   launch_count: int | None = None) -> None:
    """One optimizer step of each job under ncu: the kernels ``kernel_filter`` (an ncu
    ``--kernel-name``) matches, written to ``NAME.SUFFIX.json``: the tensor kernels for
    ``executed``, all the others for ``rest``, to find tensor work the name filter misses.
    ``cycles_only``: the tensor pipes' busy cycles alone, one pass a kernel; ``launch_count``:
    at most that many kernels (the rest phase's kernels under five metrics did not finish in
    230 s, run 27)."""
    # Hardware counters only (the SASS-level FP instruction counts cost ~0.25 s a kernel under
    # replay, run 21, too slow for a thousand kernels a step); tensor kernels only.
    metrics = NCU_CYCLES if cycles_only else ",".join([*NCU_OPS, NCU_CYCLES])
    limit = ["--launch-count", str(launch_count)] if launch_count else []
    deadline = time.time() + budget_s
    # Not the DDP job: under ncu its ranks hung for 9 minutes (run 22, NCCL kernels left out).
    # Each of its ranks runs the single-GPU job's step on its own GPU, plus the all-reduce.
    batches = [b for b in _batches(names) if JOBS[b[0][0]].world == 1]
    for batch in batches:
        if time.time() > deadline - 60:
            log(f"executed: out of time, skipped {[n for n, _g in batch]}")
            continue
        procs = []
        batch_end = time.time() + batch_s
        for name, gpus in batch:
            log(f"{suffix}: {name} under ncu on GPU {gpus}")
            # NCCL kernels are left unprofiled: replaying one rank's collective while the other
            # rank does not would deadlock, and their few FLOPs are reductions, not training.
            cmd = ["ncu", "--clock-control", "none", "--profile-from-start", "off",
                   "--target-processes", "all", "--csv", "--page", "raw", "--metrics", metrics,
                   "--kernel-name-base", "demangled", "--kernel-name", kernel_filter, *limit,
                   *_job_cmd(name, "executed", out, None)]
            procs.append((name, subprocess.Popen(cmd, env=_env(gpus), cwd=ROOT,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True, start_new_session=True)))
        for name, p in procs:
            try:
                so, se = p.communicate(timeout=max(10.0, min(batch_end, deadline) - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # ncu and every process it started
                so, se = p.communicate()
                se += "\n[killed: out of time]"
            rows = _ncu_rows(so)
            tensor = sum(r[c] for r in rows for c in NCU_OPS)
            fp = sum(r[c] * w for r in rows for c, w in NCU_FP.items())
            kernels: dict[str, dict[str, float]] = {}
            for r in rows:
                k = kernels.setdefault(r["kernel"][:120], {"n": 0, "ops": 0.0, "cycles": 0.0})
                k["n"] += 1
                k["ops"] += sum(r[c] for c in NCU_OPS)
                k["cycles"] += r[NCU_CYCLES]
            rec = {"name": name, "rc": p.returncode, "kernels_profiled": len(rows),
                   "launch_count": launch_count,
                   "tensor_ops_step": tensor, "fp_flops_step": fp,
                   "tensor_cycles_step": sum(r[NCU_CYCLES] for r in rows),
                   "by_kernel": kernels, "stderr_tail": se[-2000:]}
            (out / f"{name}.{suffix}.json").write_text(json.dumps(rec))
            log(f"{suffix}: {name} rc {p.returncode}, {len(rows)} kernels, "
                f"tensor {tensor:.4g} fp {fp:.4g} per step")


# Executed ops / nominal FLOPs of cuBLAS's cutlass_75 s1688 GEMMs (tile padding), measured by
# ncu for the 8192x1024 @ 1024x50257 product in run 21: 8.46e11 / 8.433e11.
S1688_PADDING = 8.46e11 / (2 * 8192 * 1024 * 50257)


def _executed_step(files: dict[str, Path], name: str,
                   census: dict[str, Any] | None = None) -> tuple[float | None, str | None]:
    """Executed tensor ops of one optimizer step, and where the figure comes from."""
    ex = files.get(f"{name}.executed.json")
    if ex is not None:
        rec = json.loads(ex.read_text())
        if rec["kernels_profiled"]:
            profiled = " ".join(rec["by_kernel"])
            if census and census.get("kernels") and "s1688" not in profiled:
                # Run 23 filtered kernels on their function's base name, which for cuBLAS's
                # templated cutlass kernels is "Kernel2": the s1688 GEMMs went unprofiled.
                # Their ops: the census's FLOPs for them x the padding ncu measured in run 21.
                extra = census["half_rate_flops"] * S1688_PADDING
                return rec["tensor_ops_step"] + extra, "ncu + s1688 GEMMs derived (census)"
            return rec["tensor_ops_step"], "ncu"
    spec = JOBS[name]
    if spec.world > 1:  # each DDP rank runs the single-GPU job's step (same per-GPU batch)
        single = next((n for n, s in JOBS.items() if s.world == 1
                       and asdict(s) == {**asdict(spec), "world": 1}), None)
        if single is not None:
            one, _src = _executed_step(files, single)
            if one is not None:
                return one * spec.world, f"ncu on {single}, x{spec.world} ranks"
    return None, None


def combine(dirs: list[Path], gpu: str, run: str, dest: Path) -> dict[str, Any]:
    files: dict[str, Path] = {}
    for d in dirs:
        for f in d.glob("*.json"):
            files[f.name] = f
    metered = json.loads(files["metered.json"].read_text()) if "metered.json" in files else {}
    jobs = []
    for name, spec in JOBS.items():
        ranks = [json.loads(files[f].read_text()) for f in sorted(files)
                 if f.startswith(f"{name}.metered.rank")]
        if not ranks:
            continue
        steps = ranks[0]["steps"]
        micro_batches = steps * spec.world
        nom = nominal(spec)
        fig = metered.get(name, {})
        pipes = fig.get("gpu_pipes", {})
        tensor_raw = sum(v for k, v in pipes.items() if k.startswith("hmma:"))
        share = fig.get("half_rate_fraction") or 0.0
        ex_step, ex_src = _executed_step(files, name, ranks[0].get("census"))
        job: dict[str, Any] = {
            "name": name, "spec": asdict(spec), "steps": steps, "micro_batches": micro_batches,
            "seconds": max(r["t1"] for r in ranks) - min(r["t0"] for r in ranks),
            "truth_nominal": nom["per_micro_batch"] * micro_batches,
            "truth_nominal_recompute": nom["recompute_per_micro_batch"] * micro_batches,
            # Tensor ops only: the FP32/FP16 pipes' SASS counts were too slow to replay.
            "truth_executed": ex_step * steps if ex_step else None,
            "truth_executed_source": ex_src,
            "measured": fig.get("measured"), "hardware": fig.get("hardware"),
            "analytic": fig.get("analytic"), "analytic_recompute": fig.get("recompute"),
            "compliance": fig.get("compliance"), "compliance_band": fig.get("band"),
            "half_rate_fraction": fig.get("half_rate_fraction"),
            "hardware_tensor_raw": tensor_raw, "hardware_tensor": tensor_raw / (1 + share),
            "hardware_non_tensor": sum(v for k, v in pipes.items() if not k.startswith("hmma:")),
            "gpu_pipes": pipes,
            "declared_precision": ranks[0].get("declared_precision"),
            "census": ranks[0].get("census"),
            "callback_flops": sum(r.get("callback_flops", 0.0) for r in ranks),
            "callback_recompute": sum(r.get("callback_recompute", 0.0) for r in ranks),
        }
        ex_path = files.get(f"{name}.executed.json")
        ex = json.loads(ex_path.read_text()) if ex_path is not None else None
        if ex is not None:
            job["executed_kernels"] = sorted(
                ({"kernel": k, **v, "ops_per_tensor_cycle": v["ops"] / v["cycles"]
                  if v["cycles"] else None} for k, v in ex["by_kernel"].items()),
                key=lambda k: -k["ops"])[:25]
        rest = files.get(f"{name}.rest.json")
        if rest is not None and ex_step:
            # Tensor-pipe busy cycles in kernels with no tensor ops (the rest phase): the
            # hardware figure counts them x the full rate, the executed ops do not.
            r = json.loads(rest.read_text())
            ex_cycles = ex["tensor_cycles_step"] if ex is not None else None
            job["rest_kernels_profiled"] = r["kernels_profiled"]
            job["rest_tensor_cycles_step"] = r["tensor_cycles_step"]
            job["rest_share_of_tensor_cycles"] = (r["tensor_cycles_step"] / ex_cycles
                                                  if ex_cycles else None)
        jobs.append(job)
    doc = {"gpu": gpu, "run": run, "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime()),
           "seq_len": SEQ, "warmup_steps_before_profiled_step": WARMUP_STEPS, "jobs": jobs}
    dest.write_text(json.dumps(doc, indent=1))
    print_table(doc)
    return doc


def _r(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a and b else "  -  "


def print_table(doc: dict[str, Any]) -> None:
    print(f"\n{'job':30s} {'nominal':>8s} {'hwT/exT':>7s} {'rawT/exT':>8s} {'hw/an':>6s} "
          f"{'an/nom':>6s} {'cb/nom':>6s} {'comp/nom':>8s} {'half':>5s}")
    for j in doc["jobs"]:
        an_ex = (j["analytic"] or 0) - (j["analytic_recompute"] or 0)
        print(f"{j['name']:30s} {j['truth_nominal']:8.3g} "
              f"{_r(j['hardware_tensor'], j['truth_executed']):>7s} "
              f"{_r(j['hardware_tensor_raw'], j['truth_executed']):>8s} "
              f"{_r(j['hardware'], j['analytic']):>6s} {_r(an_ex, j['truth_nominal']):>6s} "
              f"{_r(j['callback_flops'] - j['callback_recompute'], j['truth_nominal']):>6s} "
              f"{_r(j['compliance'], j['truth_nominal']):>8s} "
              f"{(j['half_rate_fraction'] or 0):5.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--phase", choices=["metered", "executed", "rest", "all"], default="all",
                    help="rest: the kernels the executed phase's name filter leaves out")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--launch-count", type=int, help="rest phase: profile at most this many "
                    "kernels")
    ap.add_argument("--budget-s", type=float, default=520.0, help="executed phase time limit")
    ap.add_argument("--run-job")
    ap.add_argument("--mode", choices=["metered", "executed"])
    ap.add_argument("--socket")
    ap.add_argument("--combine", nargs="+", type=Path)
    ap.add_argument("--gpu", default="h200")
    ap.add_argument("--run", default="0")
    ap.add_argument("--nominal", help="print one job's nominal FLOPs (meta device) and exit")
    a = ap.parse_args()
    if a.nominal:
        print(json.dumps(nominal(JOBS[a.nominal])))
        return 0
    if a.run_job:
        run_job(a.run_job, a.mode, a.out, a.socket)
        return 0
    if a.combine:
        dest = ROOT / "benchmarks" / "results" / f"real-training-{a.gpu}-{a.run}.json"
        combine(a.combine, a.gpu, a.run, dest)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in a.jobs.split(",") if n]
    if a.phase in ("metered", "all"):
        phase_metered(a.out, names)
    if a.phase in ("executed", "all"):
        phase_executed(a.out, names, a.budget_s)
    if a.phase == "rest":
        phase_executed(a.out, names, a.budget_s, kernel_filter=REST_KERNELS, suffix="rest",
                       batch_s=a.budget_s, cycles_only=True, launch_count=a.launch_count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
