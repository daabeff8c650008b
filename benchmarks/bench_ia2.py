"""IA2 step time and memory as ratios to TRL's own SFTTrainer, and the one-time target precompute (make bench).

Both train the same model (LoRA r=16 on q,k,v,o) on the same student rows of the offline ICL suite (query +
answer, loss on the answer) with the same batch, each in a fresh process: median step time after two warm-up
steps, tokens/s and peak memory (benchmarks/timing.py). IA2 also reports the time of its
one-time teacher pass (k demonstrations + query, all layers' self-attention outputs, cached in fp16) and the
size of the cache file.

    python benchmarks/bench_ia2.py [--model embedded/SmolLM2-135M-Instruct] [--shape LAYERS,HIDDEN] [--steps 12] [--batch 8]
"""

import tempfile
import time

from timing import load_model, run_benchmark, train_and_measure

CONFIGS = {  # name -> (IA2 method, label type), or None for TRL's SFTTrainer
    "sft": None,
    "ia2_act": ("act", "ground_truth"),  # the same target tokens as the SFT rows
    "ia2_tna": ("tna", "ground_truth"),
    "ia2_act_icl_outputs": ("act", "icl_outputs"),  # the recipes' default: the teacher pass also decodes greedily
}


def run_one(name, args, device):
    model_name, steps, batch, num_demos = args.model, args.steps, args.batch, args.num_demos
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from reprpo_trl import IA2Config, IA2Trainer
    from reprpo_trl.icl import load_icl_task

    model, tokenizer = load_model(model_name, device, args.shape)
    examples, pool = load_icl_task("suite:sentiment", n=steps * batch, pool_size=64)
    common = dict(output_dir=f"/tmp/bench_{name}", max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                  report_to="none", save_strategy="no", logging_steps=steps, use_cpu=device == "cpu", bf16=device == "cuda",
                  max_length=128, seed=0, disable_tqdm=True, gradient_checkpointing=False)  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    extra = {}
    if CONFIGS[name] is None:
        rows = Dataset.from_dict({"prompt": examples["query"], "completion": [" " + a for a in examples["answer"]]})
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=rows, processing_class=tokenizer, peft_config=lora)
    else:
        cache = tempfile.mkdtemp()
        method, label_type = CONFIGS[name]
        args = IA2Config(**common, ia2_method=method, label_type=label_type, num_demos=num_demos, max_new_tokens=2, target_cache_dir=cache)
        start = time.perf_counter()
        trainer = IA2Trainer(model, args=args, train_dataset=examples, demo_pool=pool, processing_class=tokenizer, peft_config=lora)
        extra = {"precompute_s": time.perf_counter() - start, "cache_mib": trainer.targets_path.stat().st_size / 2**20}
    return {**train_and_measure(trainer, device), **extra}


def main():
    args, device, results = run_benchmark(__file__, __doc__, CONFIGS, run_one, {"num_demos": (int, 4)})
    base = results["sft"]
    print(f"\nratios vs TRL SFTTrainer, {device}, model {args.model}, batch {args.batch}, {args.steps} steps:")
    for name, r in results.items():
        once = f"  one-time targets {r['precompute_s']:.1f}s for {args.steps * args.batch} examples, cache {r['cache_mib']:.1f} MiB" if "precompute_s" in r else ""
        print(f"{name:20s} time {r['step_s'] / base['step_s']:5.2f}  cpu {r['cpu_s'] / base['cpu_s']:5.2f}  memory {r['peak_mib'] / base['peak_mib']:5.2f}  "
              f"{1000 * r['step_s']:.0f} ms  {r['tokens_per_s']:.0f} tokens/s{once}")  # fmt: skip


if __name__ == "__main__":
    main()
