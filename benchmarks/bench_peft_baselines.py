"""Time and memory of the PEFT-baselines study's training runs (recipes/peft_baselines/gpt_neo_1.3b_*.yaml), as
ratios to full fine-tuning with TRL's own SFTTrainer (every run here is that trainer; only the adapter differs).

Each config is its recipe exactly as shipped (adapter, batch, gradient accumulation, gradient checkpointing,
fp16 on GPU) on a model of GPT-Neo-1.3B's shapes with random weights (no hub here; time and memory do not depend
on the weights' values) and the embedded tokenizer (vocabulary 49,152 instead of 50,257), trained on rows of the
offline Commonsense-170K stand-in, whose prompts are of the real rows' length (~100-150 tokens). Median optimizer
step time after two warm-up steps, peak memory, and the time one epoch of Commonsense-170K (170,300 rows) takes at
that speed. Each config runs in a fresh process.

    python benchmarks/bench_peft_baselines.py [--steps 4]     # a GPU; on CPU use --layers 2 for a smoke run
"""

import math
from pathlib import Path

from timing import run_benchmark, train_and_measure

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "peft_baselines"
CONFIGS = {name: RECIPES / f"gpt_neo_1.3b_{name}.yaml" for name in ("full", "hira", "lora", "ia3")}
EPOCH_ROWS = 170_420 - 120  # Commonsense-170K less the 120 held-out rows


def gpt_neo_shaped(tokenizer_name: str, layers: int) -> str:
    """A random GPT-Neo-1.3B-shaped model (hidden 2048, 16 heads, global/local attention) saved with the tokenizer."""
    from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

    from reprpo_trl.models import resolve_model

    path = Path(f"/tmp/bench_gpt_neo_{layers}")
    if not (path / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_name))
        config = GPTNeoConfig(vocab_size=len(tokenizer), hidden_size=2048, num_layers=layers, num_heads=16,
                              attention_types=[[["global", "local"], layers // 2]], window_size=256, max_position_embeddings=2048,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        GPTNeoForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def run_one(name, args, device):
    from reprpo_trl.train import build_trainer, parse_args

    model = gpt_neo_shaped(args.model, args.layers)
    flags = ["--config", str(CONFIGS[name]), "--model_name_or_path", model, "--max_steps", str(args.steps),
             "--train_dataset", "suite:commonsense:train", "--eval_strategy", "no", "--output_dir", f"/tmp/bench_{name}",
             "--logging_steps", str(args.steps), "--disable_tqdm", "true"]  # fmt: skip
    if device == "cpu":
        flags += ["--use_cpu", "true", "--fp16", "false", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"]
    run_args, train_args, model_args, adapter_args = parse_args(flags)
    rows_per_step = train_args.per_device_train_batch_size * train_args.gradient_accumulation_steps
    run_args.eval_dataset, run_args.max_train_samples = None, args.steps * rows_per_step
    trainer = build_trainer(run_args, train_args, model_args, adapter_args)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = train_and_measure(trainer, device)
    epoch_h = math.ceil(EPOCH_ROWS / rows_per_step) * result["step_s"] / 3600
    return {**result, "rows_per_step": rows_per_step, "trainable": trainable, "epoch_h": epoch_h}


def main():
    args, device, results = run_benchmark(__file__, __doc__, CONFIGS, run_one, {"layers": (int, 24)})
    full = results.get("full")
    print(f"\n{device}, GPT-Neo-1.3B shapes ({args.layers} layers), {args.steps} optimizer steps per config")
    print("| adapter | trainable params | rows/step | s/optimizer step | peak MiB | one epoch (h) | time ratio to full | memory ratio to full |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = (f"{r['step_s'] / full['step_s']:.2f} | {r['peak_mib'] / full['peak_mib']:.2f}") if full else "- | -"
        print(f"| {name} | {r['trainable']:,} | {r['rows_per_step']} | {r['step_s']:.2f} | {r['peak_mib']:.0f} | {r['epoch_h']:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
