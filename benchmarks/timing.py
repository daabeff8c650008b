"""Shared by the benchmark scripts: train a built trainer and measure its median step time and peak memory."""

import resource
import statistics
import time


def train_and_measure(trainer, device: str) -> dict:
    """Median step time after two warm-up steps, and peak memory (CUDA max_memory_allocated on GPU, peak RSS on
    CPU, which includes the weights every configuration shares)."""
    import torch
    from transformers import TrainerCallback

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times[2:]), "peak_mib": peak}


def run_benchmark(script: str, doc: str, configs: dict, run_one, options: dict | None = None):
    """Parse --model --steps --batch --configs (+ `options`: flag -> (type, default)); with --one NAME run
    `run_one(name, args, device)` here and print its JSON; otherwise run every config in a fresh process (so
    peak memory is its own) and return (args, device, {name: result})."""
    import argparse
    import json
    import subprocess
    import sys

    import torch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--configs", nargs="*", default=list(configs))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    for flag, (kind, default) in (options or {}).items():
        parser.add_argument(f"--{flag}", type=kind, default=default)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(run_one(args.one, args, device)))
        sys.exit(0)
    shared = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("configs", "one")]
    results = {}
    for name in args.configs:
        out = subprocess.run([sys.executable, script, "--one", name, *shared], capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name:28s} {json.dumps(results[name])}", flush=True)
    return args, device, results
