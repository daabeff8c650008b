"""Shared by the benchmark scripts: build the model, train a built trainer and measure its median step time,
tokens per second and peak memory.

Peak memory: on GPU CUDA's max_memory_allocated over the run (weights included). On CPU the peak of the torch CPU
allocator over one training step (the last), from torch.profiler's allocation and free events: bytes allocated
during the step, above what was live when it began (so the weights and optimizer state every configuration
shares are not in it); the process's peak RSS is reported beside it.

CPU allocator: torch allocates CPU tensors with glibc malloc, which maps every block above its (moving) mmap
threshold fresh from the kernel and unmaps it when freed, so each large activation is paid again as page faults
(6.3 million minor faults, 18 s of system time in 4 long-mode DPO steps). How many blocks cross that threshold
depends on the order of earlier frees, so two configurations doing the same tensor work differed by 10% and one
configuration by up to 15% between processes. CPU runs therefore run with `CPU_ALLOCATOR_ENV` (a benchmark script
restarts itself with it, `use_steady_cpu_allocator`): malloc takes everything from its heap and keeps what is
freed, and each step reuses the memory of the one before.
"""

import os
import resource
import statistics
import time

CPU_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}  # see the module docstring
WARMUP_STEPS = 2


def use_steady_cpu_allocator() -> None:
    """On CPU, restarts this script with CPU_ALLOCATOR_ENV unless it has it (glibc reads it only when a process
    starts; a value already set wins). The configurations' processes inherit it."""
    import sys

    import torch

    if torch.cuda.is_available() or all(k in os.environ for k in CPU_ALLOCATOR_ENV):
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**CPU_ALLOCATOR_ENV, **os.environ})


def load_model(name: str, device: str, shape: str | None = None):
    """(model, tokenizer): `name` as resolved by reprpo_trl.models, or with `shape` "layers,hidden[,vocab]" a
    random-init model of that shape with the architecture and tokenizer of `name` (heads of 64 dims, a third of
    them for keys/values when that divides, intermediate 8/3 hidden, the first `vocab` token ids only; speed and
    memory do not depend on the weights' values)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from reprpo_trl.models import resolve_model

    path = resolve_model(name)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not shape:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer
    layers, hidden, *vocab = (int(x) for x in shape.split(","))
    heads = max(1, hidden // 64)
    config = AutoConfig.from_pretrained(path)
    config.vocab_size = vocab[0] if vocab else config.vocab_size
    config.update({"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "head_dim": hidden // heads,
                   "num_key_value_heads": max(1, heads // 3) if heads % 3 == 0 else heads, "intermediate_size": 8 * hidden // 3})  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype), tokenizer


def cpu_peak_bytes(profiler) -> int:
    """Peak of the running sum of torch CPU allocator events (allocations positive, frees negative)."""
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )  # fmt: skip
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def train_and_measure(trainer, device: str) -> dict:
    """Median step time after two warm-up steps (the last step, profiled for memory on CPU, left out), the
    median CPU time of the process over the same steps (on a shared machine the part of the wall time that other
    tenants' load does not add), tokens per second at the median wall time, peak memory and the median number of
    minor page faults per step (see the module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    times, cpu_times, faults, peak = [], [], [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            if device == "cpu" and state.global_step == state.max_steps - 1:
                self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self.profiler.__enter__()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
            self.faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def on_step_end(self, args, state, control, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            cpu_times.append(time.process_time() - self.cpu_start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults_start)
            if getattr(self, "profiler", None) is not None:
                self.profiler.__exit__(None, None, None)
                peak["step"] = cpu_peak_bytes(self.profiler)
                self.profiler = None

    trainer.add_callback(Timer())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    measured = slice(WARMUP_STEPS, len(times) - (device == "cpu"))
    step_s, cpu_s = statistics.median(times[measured]), statistics.median(cpu_times[measured])
    tokens = getattr(trainer, "_total_train_tokens", 0) / max(len(times), 1)
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak["step"] / 2**20
    return {"step_s": step_s, "cpu_s": cpu_s, "tokens_per_s": tokens / step_s, "peak_mib": peak_mib, "rss_mib": rss,
            "page_faults": statistics.median(faults[measured])}


def run_benchmark(script: str, doc: str, configs: dict, run_one, options: dict | None = None):
    """Parse --model --shape --steps --batch --repeats --configs (+ `options`: flag -> (type, default)); with
    --one NAME run `run_one(name, args, device)` here and print its JSON; otherwise run every config in a fresh
    process (so peak memory is its own), `repeats` rounds in alternating order, and return
    (args, device, {name: result with the median step time of the rounds})."""
    import argparse
    import json
    import subprocess
    import sys

    import torch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded/SmolLM2-135M-Instruct")
    parser.add_argument("--shape", default=None, help="layers,hidden[,vocab]: a random-init model of that shape (see timing.load_model)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the configs, every other one in reverse order")
    parser.add_argument("--configs", nargs="*", default=list(configs))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    for flag, (kind, default) in (options or {}).items():
        if kind is bool:
            parser.add_argument(f"--{flag}", action="store_true")
        else:
            parser.add_argument(f"--{flag}", type=kind, default=default)
    args = parser.parse_args()
    use_steady_cpu_allocator()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fewest = WARMUP_STEPS + 1 + (device == "cpu")
    if args.steps < fewest:
        parser.error(f"--steps {args.steps}: need at least {fewest} ({WARMUP_STEPS} warm-up steps, one measured, on CPU "
                     "also the last one, profiled for memory)")
    unknown = sorted(set(args.configs) - set(configs))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {sorted(configs)}")
    if args.one:
        print(json.dumps(run_one(args.one, args, device)))
        sys.exit(0)
    # values passed on to each configuration's process; `is`, not `in`: 1 == True and 0 == False (a `--batch 1`
    # went missing that way, and every process trained its default batch of 8)
    shared = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("configs", "one") and v is not None and not isinstance(v, bool)]
    shared += [f"--{k}" for k, v in vars(args).items() if v is True]
    runs = {name: [] for name in args.configs}
    for round_ in range(args.repeats):
        for name in args.configs if round_ % 2 == 0 else reversed(args.configs):
            out = subprocess.run([sys.executable, script, "--one", name, *shared], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{name:28s} {json.dumps(runs[name][-1])}", flush=True)
    results = {}
    for name, rs in runs.items():
        results[name] = {**rs[0], **{k: statistics.median(r[k] for r in rs) for k in ("step_s", "cpu_s", "tokens_per_s", "peak_mib")}}
        results[name]["step_s_all"] = [r["step_s"] for r in rs]
    return args, device, results
