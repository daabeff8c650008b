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
