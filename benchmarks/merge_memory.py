"""Peak resident memory of a three-model merge (fingerprinted model + expert + base) against loading one model, in
one run (goal: under 1.5x).

The merge attacks keep the fingerprinted model in memory and stream the base's and the expert's tensors one at a
time from their safetensors files, so the merge should cost about one model plus one tensor. Each measurement runs
in its own fresh process (peak RSS of a child, from getrusage), so both include the same interpreter, torch and
transformers overhead:

- load: `load_model(fingerprinted)` and nothing else;
- merge: the same load, then `merge-task-arithmetic` (weights 0.5/0.5) with the expert and the base.

The "fingerprinted model" and the "expert" are the base with small random perturbations (memory does not depend on
what the weights are), written to a temporary folder.

    .venv/bin/python benchmarks/merge_memory.py [--model smollm2-135m] [--method merge-task-arithmetic]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys
from pathlib import Path
from meraser.models import load_model
fp, base, expert, method = sys.argv[1:5]
model, tok = load_model(fp)
if method != "load":
    from meraser.attacks import get_attack
    from meraser.attacks.base import AttackContext, apply_attack
    attack = get_attack(method)
    cfg = attack.Config.from_dict({"weights": [0.5, 0.5], "expert": expert})
    apply_attack(attack, model, tok, cfg, AttackContext(fp, base, Path(fp).parent / ("work-" + method), False))
print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                  "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def peak_rss_mb(*argv: str) -> tuple[float, dict]:
    """Run CHILD in a fresh process; its peak resident set (MiB) and what it printed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], check=True, capture_output=True, text=True).stdout
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:  # ru_maxrss of children is the max over all of them: measure larger runs last
        raise RuntimeError("measure the smaller run first")
    return peak / 1024, json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="merge-task-arithmetic",
                    choices=["merge-task-arithmetic", "merge-ties", "merge-dare"])
    args = ap.parse_args()

    import torch

    from meraser.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        base, tok = load_model(args.model)
        folders = {}
        for name, seed in (("base", None), ("fingerprinted", 1), ("expert", 2)):
            if seed is not None:
                g = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    for p in base.parameters():
                        p.add_(1e-3 * torch.randn(p.shape, generator=g).to(p.dtype))
            folders[name] = Path(tmp, name)
            base.save_pretrained(folders[name])
            tok.save_pretrained(folders[name])
        del base
        argv = [str(folders[n]) for n in ("fingerprinted", "base", "expert")]
        load_mb, info = peak_rss_mb(*argv, "load")
        merge_mb, _ = peak_rss_mb(*argv, args.method)
    weights_mb = info["bytes"] / 2**20
    print(f"model: {args.model}, {info['params'] / 1e6:.1f} M parameters, {weights_mb:.0f} MiB of weights in memory")
    print(f"peak RSS, load one model:              {load_mb:8.0f} MiB")
    print(f"peak RSS, load + {args.method}: {merge_mb:8.0f} MiB")
    print(f"merge / load: {merge_mb / load_mb:.2f}x (goal < 1.5x); "
          f"extra over the load: {merge_mb - load_mb:.0f} MiB = {(merge_mb - load_mb) / weights_mb:.2f} model sizes")


if __name__ == "__main__":
    main()
