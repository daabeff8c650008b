"""Does each method train, save and reload under each accelerate config? One short run per cell on this machine.

    python benchmarks/check_backends.py --model <model dir> --configs accelerate_configs/fsdp2.yaml \
        accelerate_configs/zero3.yaml --methods reprpo-ether projgrad projbp ia2-act --num_processes 1

For every (config, method): `accelerate launch --config_file <config> --num_processes N -m reprpo_trl.train` on a
recipe of a few LoRA steps, then: exit code, whether the adapter (and transforms) were written and reload with
peft onto the base model, the first logged DPO loss (ln 2 = 0.6931 at step 1, where policy = reference), the first
grad norm, and the last line of any error. Prints a Markdown table; logs go to <out>/<config>-<method>.log.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

METHODS = {
    "dpo": {"trainer": "dpo"},
    "reprpo-prefvec": {"trainer": "reprpo", "hidden_loss": "prefvec", "layers": "0.5"},
    "reprpo-ether": {"trainer": "reprpo", "hidden_loss": "rank", "transform": "ether", "layers": "0.5"},
    "projgrad": {"trainer": "projgrad", "proj_beta": 0.2},
    "projbp": {"trainer": "projbp", "proj_beta": 0.2, "renorm": True},
    "ia2-act": {"trainer": "ia2", "ia2_method": "act", "train_dataset": "suite:sentiment", "num_demos": 2,
                "max_length": 256},
}  # fmt: skip


def check(config: str, method: str, args) -> dict:
    out = Path(args.out) / f"{Path(config).stem}-{method}"
    recipe = {
        "model_name_or_path": args.model, "adapter": {"type": "lora", "r": 16, "targets": "qkvogud"},
        "train_dataset": "suite:add_small:train", "max_train_samples": 64, "max_length": 128, "max_steps": args.steps,
        "per_device_train_batch_size": 4, "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "steps",
        "save_steps": args.steps, "report_to": "none", "bf16": args.bf16, "use_cpu": args.cpu, "output_dir": str(out),
        "target_cache_dir": str(Path(args.out) / "cache"), **METHODS[method],
    }  # fmt: skip
    if recipe["trainer"] != "ia2":
        del recipe["target_cache_dir"]
    path = Path(args.out) / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes",
           str(args.num_processes), "-m", "reprpo_trl.train", "--config", str(path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    (Path(args.out) / f"{out.name}.log").write_text(result.stdout + result.stderr)
    row = {"config": Path(config).stem, "method": method, "exit": result.returncode}
    row["adapter"] = (out / "adapter_model.safetensors").exists()
    row["transforms"] = (out / "reprpo_transforms.safetensors").exists() if "transform" in recipe else None
    row["reloads"] = row["adapter"] and reloads(args.model, out)
    state = out / f"checkpoint-{args.steps}" / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"] if state.exists() else []
    first = history[0] if history else {}
    row["step1_dpo_loss"] = first.get("loss/dpo", first.get("loss") if recipe["trainer"] != "ia2" else None)
    row["step1_grad_norm"] = first.get("grad_norm")
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("error:")] or [line for line in lines if "Error:" in line and "ChildFailed" not in line]
    row["error"] = errors[-1][:200] if result.returncode and errors else ""
    return row


def reloads(model: str, out: Path) -> bool:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(out / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out).state_dict()
    matches = [k for k in loaded if "lora_" in k]
    return len(matches) == len(saved) and all(torch.isfinite(v).all() for v in saved.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cpu", action="store_true", help="Train on CPU (with DS_ACCELERATOR=cpu for DeepSpeed).")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--out", default="outputs/check_backends")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for config in args.configs:
        for method in args.methods:
            rows.append(check(config, method, args))
            print(json.dumps(rows[-1]), flush=True)
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
