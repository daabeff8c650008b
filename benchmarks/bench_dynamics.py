"""Cost of WeightStatsCallback: training time with it (one collection per `--every` steps) over the same training
without it, in the same process, alternating the two `--repeats` times; the median ratio is the overhead.

Both arms train TRL's own DPOTrainer as recipes/dpo.yaml does (LoRA r16 on q,k,v,o,gate,up,down; 8 pairs x 2
accumulation per optimizer step, max_length 128) on the same data and seed; the
callback computes the statistics of every LoRA update s*B*A (210 matrices of up to 1536 x 576 on SmolLM2-135M).
Reported per repeat and as medians: the wall-time ratio, the process CPU-time ratio (on a shared machine whose load
changes between the two arms the CPU time is the steadier measure; with one thread it is what a dedicated core's
wall time would be), and the callback's own seconds per collection (its `seconds` column) as a fraction of the wall
time of the `--every` steps it covers.

    python benchmarks/bench_dynamics.py [--model embedded/SmolLM2-135M-Instruct] [--steps 20] [--batch 8]
                                        [--accumulation 2] [--every 10] [--repeats 3] [--threads N]
"""

import argparse
import statistics
import tempfile
import time

import pandas as pd
import torch


def build(model_name: str, steps: int, batch: int, accumulation: int, output_dir: str):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from reprpo_trl.data import make_family
    from reprpo_trl.models import resolve_model

    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = DPOConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                       gradient_accumulation_steps=accumulation,
                       report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, max_length=128,
                       seed=0, disable_tqdm=True, gradient_checkpointing=False)  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    data = make_family("add_word", "train", n=steps * batch * accumulation)
    return DPOTrainer(model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)


def timed_run(args, with_callback: bool) -> tuple[float, pd.DataFrame | None]:
    from reprpo_trl.dynamics import WeightStatsCallback

    with tempfile.TemporaryDirectory() as out:
        trainer = build(args.model, args.steps, args.batch, args.accumulation, out)
        if with_callback:
            trainer.add_callback(WeightStatsCallback(trainer, every=args.every))
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        table = pd.read_parquet(f"{out}/dynamics/weight_stats.parquet") if with_callback else None
    return seconds, cpu_seconds, table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation (recipes/dpo.yaml: 8 x 2)")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios, cpu_ratios, fractions = [], [], []
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)  # alternate which arm runs first
        wall, cpu = {}, {}
        for with_callback in order:
            wall[with_callback], cpu[with_callback], table = timed_run(args, with_callback)
            if with_callback:
                collections = table.seconds
        ratios.append(wall[True] / wall[False])
        cpu_ratios.append(cpu[True] / cpu[False])
        fractions.append(collections.median() / (args.every * wall[True] / args.steps))
        print(f"repeat {repeat}: wall without {wall[False]:.1f} s, with {wall[True]:.1f} s, ratio {ratios[-1]:.3f}; "
              f"CPU without {cpu[False]:.1f} s, with {cpu[True]:.1f} s, ratio {cpu_ratios[-1]:.3f}; {len(collections)} "
              f"collections, median {collections.median():.2f} s = {fractions[-1]:.2%} of {args.every} steps", flush=True)  # fmt: skip
    print(f"\nmedian over {args.repeats} repeats ({torch.get_num_threads()} threads, {args.steps} steps, batch {args.batch} "
          f"x {args.accumulation} accumulation, one collection per {args.every} steps): wall-time ratio "
          f"{statistics.median(ratios):.3f}, CPU-time ratio {statistics.median(cpu_ratios):.3f}, collection "
          f"{statistics.median(fractions):.2%} of the wall time of the steps it covers")  # fmt: skip


if __name__ == "__main__":
    main()
