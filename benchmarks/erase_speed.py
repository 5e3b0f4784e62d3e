"""Erase speed: one erase epoch on the reference mismatched rows, the reference code's recipe vs meraser's, in one run
(goal: >= 5x).

Three runs on the same rows of ../shared/data/meraser_reference/mismatched_dataset.json and the same model:
- reference recipe: the `reference` erase preset (LoRA r=8, dropout 0.05 on q/v, raw question+answer text,
  whole-sequence loss) with the public MEraser code's engineering: every sample padded to 512 tokens, batch 1,
  fp32, gradient checkpointing;
- meraser engineering: the same `reference` preset with meraser's engineering: dynamic padding to the longest row
  of a batch, length-grouped batches of 8, bf16 autocast where the CPU has it, no gradient checkpointing, the LM
  head and loss in chunks on labelled positions, no attention mask on right-padded rows (the last two are exact,
  see src/meraser/lm_loss.py). Only the engineering differs from the first run;
- meraser defaults: what `meraser erase` runs with no options, the `paper` preset (LoRA r=16 on q/v, no dropout,
  the chat template, loss on the response) with the same engineering. The goal is measured on this one.
Speed is rows per second of wall time for the whole epoch (model load excluded).

    .venv/bin/python benchmarks/erase_speed.py [--model smollm2-135m] [--rows 300] [--random-init]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared/data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=300, help="first N reference rows (all 300 by default)")
    ap.add_argument("--data", type=Path, default=SHARED / "meraser_reference/mismatched_dataset.json")
    ap.add_argument("--random-init", action="store_true",
                    help="--model is a folder with config and tokenizer only: time its architecture with random "
                         "weights (speed does not depend on the weights)")
    args = ap.parse_args()

    import transformers
    from meraser.utils import console as log_console
    from rich.table import Table

    from meraser.data import load_pairs
    from meraser.erase.meraser import erase, preset
    from meraser.models import device, load_model, load_tokenizer

    transformers.utils.logging.set_verbosity_error()
    rows = load_pairs(str(args.data))[: args.rows]

    def fresh_model(fp32: bool):
        if not args.random_init:
            model, tok = load_model(args.model)
        else:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model)).to(device())
            tok = load_tokenizer(args.model)
        # the reference code trains fp32 weights; on a GPU load_model gives bf16 weights, so cast back for it
        return (model.float() if fp32 else model), tok

    recipes = {  # name: (erase preset, overrides)
        "reference recipe (reference preset; pad 512, batch 1, fp32, grad ckpt)": ("reference", {
            "batch_size": 1, "pad_to_length": 512, "precision": "fp32", "gradient_checkpointing": True,
            "group_by_length": False, "fused_loss": False, "mask_free": False}),
        "meraser engineering (reference preset; dynamic pad, batch 8 by length, bf16)": ("reference", {"batch_size": 8}),
        "meraser defaults (paper preset, same engineering)": ("paper", {}),
    }
    where = device() + (" (random weights)" if args.random_init else "")
    table = Table(title=f"one erase epoch on {len(rows)} reference mismatched rows, {args.model}, {where}")
    for h in ["recipe", "steps", "seconds", "rows/s", "final loss"]:
        table.add_column(h, justify="right")
    speeds = []
    for name, (preset_name, overrides) in recipes.items():
        model, tok = fresh_model(overrides.get("precision") == "fp32")
        cfg = preset("erase", preset_name, {"epochs": 1, "save_steps": -1, **overrides})
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            res = erase(model, tok, rows, cfg, Path(tmp) / "adapter", merge_out=False, save=False, progress=True)
            secs = time.perf_counter() - t
        speeds.append(len(rows) / secs)
        table.add_row(name, str(res.metrics.get("steps", "")), f"{secs:.0f}", f"{speeds[-1]:.2f}",
                      f"{res.metrics.get('train_loss', float('nan')):.3f}")
    log_console(160).print(table)
    print(f"speed-up of meraser's engineering alone (same preset): {speeds[1] / speeds[0]:.1f}x")
    print(f"speed-up of meraser's defaults over the reference recipe: {speeds[2] / speeds[0]:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
