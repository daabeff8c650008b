"""Where each configuration's step time goes beyond TRL's DPO: wall time per step inside the package's own work
(hooks and pooling, hidden-state loss, transforms, gradient projection, the step's logging), and host syncs
(`.item()` / `.tolist()` calls) per step, on the model, data and batch of bench_trainers.py, one process.

    python benchmarks/profile_trainers.py [--shape 4,256] [--batch 8] [--steps 8] [--max_length 976] [--configs ...]
"""

import argparse
import collections
import functools
import statistics
import time

import torch

import bench_trainers
import timing

TIMED = {  # label -> (module, qualified name): the package's own per-step work
    "pool (hooks)": ("reprpo_trl.sites", "pool"),
    "hidden_state_loss": ("reprpo_trl.trainers.reprpo", "ReprPOTrainer.hidden_state_loss"),
    "transforms": ("reprpo_trl.transforms", "SiteTransforms.forward"),
    "projgrad edit_gradients": ("reprpo_trl.trainers.projgrad", "ProjGradTrainer.edit_gradients"),
    "project_update (both hooks)": ("reprpo_trl.trainers.projgrad", "ProjGradTrainer._project_update"),
    "remember_parameters": ("reprpo_trl.trainers.projgrad", "ProjGradTrainer._remember_parameters"),
    "projbp backward edit": ("reprpo_trl.projection", "project_rows"),
    "end_step (logging sync)": ("reprpo_trl.trainers.guard", "GuardedTrainer._end_step"),
}


def instrument(totals, counts):
    import importlib

    for label, (module_name, qualname) in TIMED.items():
        module = importlib.import_module(module_name)
        owner, attr = (module, qualname) if "." not in qualname else (getattr(module, qualname.split(".")[0]), qualname.split(".")[1])
        if not hasattr(owner, attr):
            continue
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*a, _original=original, _label=label, **k):
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                totals[_label] += time.perf_counter() - start

        setattr(owner, attr, timed)
        for other in ("reprpo_trl.trainers.projbp",):  # modules that imported the function by name
            other = importlib.import_module(other)
            if getattr(other, attr, None) is original:
                setattr(other, attr, timed)
    for method in ("item", "tolist"):
        original = getattr(torch.Tensor, method)

        def counted(self, *a, _original=original, **k):
            counts["host syncs"] += 1
            return _original(self, *a, **k)

        setattr(torch.Tensor, method, counted)


def profile_one(name, args):
    from transformers import TrainerCallback

    totals, counts = collections.defaultdict(float), collections.Counter()
    instrument(totals, counts)
    trainer = bench_trainers.build_trainer(name, args, "cpu")
    steps = []

    class PerStep(TrainerCallback):
        def on_step_begin(self, *a, **k):
            totals.clear(), counts.clear()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append((time.perf_counter() - self.start, dict(totals), dict(counts)))

    trainer.add_callback(PerStep())
    trainer.train()
    timed = steps[timing.WARMUP_STEPS :]
    step = statistics.median(s for s, _, _ in timed)
    labels = sorted({label for _, t, _ in timed for label in t})
    parts = {label: statistics.median(t.get(label, 0.0) for _, t, _ in timed) for label in labels}
    syncs = statistics.median(c.get("host syncs", 0) for _, _, c in timed)
    return step, parts, syncs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded/SmolLM2-135M-Instruct")
    parser.add_argument("--shape", default="4,256")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=0)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--configs", nargs="*", default=list(bench_trainers.CONFIGS))
    args = parser.parse_args()
    timing.use_steady_cpu_allocator()
    torch.set_num_threads(torch.get_num_threads())
    for name in args.configs:
        step, parts, syncs = profile_one(name, args)
        listed = ", ".join(f"{label} {1000 * t:.1f} ms ({100 * t / step:.1f}%)" for label, t in parts.items() if t > 0)
        print(f"{name:28s} step {1000 * step:7.1f} ms, host syncs/step {syncs:3.0f}; {listed}", flush=True)


if __name__ == "__main__":
    main()
