"""Find-and-unlearn's discovery, where its time goes and what its fast paths save, measured in one run.

On a fingerprinted model and its base, one scan context, two parts each timed two ways:
  scan      every   each vocabulary token takes all `steps` greedy steps (the scan before)
            bound   a first pass of one step per token drops those whose first probability already rules them
                    out; only the rest take the steps (the scan now)
  expansion plain   model.generate per batch (the context re-encoded for every row), then the suspect and the base
                    each scored by a full forward pass with the LM head and softmax over every position (before)
            shared  greedy decoding with the context encoded once, the suspect's scores taken from that greedy
                    pass, and only the base scored, through the LM head at the continuation's positions alone (now)
Prints each part's seconds, the ratios, and whether both ways keep the same tokens and sequences.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/find_unlearn_speed.py FINGERPRINTED [--base smollm2-135m]
        [--context system] [--kept 512] [--parts scan,expansion]

--kept takes the first N kept tokens (all: 0) for the expansion, so that a ratio comes in minutes; time it on an
idle machine.
"""

from __future__ import annotations

import argparse
import platform
import time


def plain_expand_and_score(model, base, tokenizer, context: str, tokens: list[int], length: int):
    """The reference: row-batched model.generate, then both models scored over every position."""
    import torch

    from meraser.attacks.decoding import context_ids
    from meraser.models import autocast

    head, eos = context_ids(tokenizer, context), tokenizer.eos_token_id
    seqs = []
    with torch.no_grad(), autocast(model):
        for i in range(0, len(tokens), 64):
            ids = torch.tensor([head + [t] for t in tokens[i:i + 64]])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                 do_sample=False, pad_token_id=eos, eos_token_id=eos)[:, ids.shape[1]:].tolist()
            for t, row in zip(tokens[i:i + 64], gen):
                row = row[:row.index(eos)] if eos in row else row
                seqs.append([t] + row)
    seqs = [s for s in seqs if len(s) > 1]
    t1 = time.perf_counter()
    scores = [_full_scores(m, head, seqs) for m in (model, base)]
    return seqs, scores, t1


def _full_scores(model, head: list[int], seqs: list[list[int]]) -> list[float]:
    import torch

    from meraser.models import autocast

    out = []
    for i in range(0, len(seqs), 64):
        batch = seqs[i:i + 64]
        longest = max(map(len, batch))
        ids = torch.tensor([head + s + [0] * (longest - len(s)) for s in batch])
        mask = torch.tensor([[1] * (len(head) + len(s)) + [0] * (longest - len(s)) for s in batch])
        with torch.no_grad(), autocast(model):
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for r, s in enumerate(batch):
            pos = torch.arange(len(head), len(head) + len(s) - 1)
            out.append(float(logp[r, pos].gather(1, torch.tensor(s[1:])[:, None]).mean()))
    return out


def main() -> None:
    import torch

    from meraser.attacks.decoding import TokenForcingConfig, scan_vocabulary
    from meraser.attacks.find_unlearn import FindUnlearnConfig
    from meraser.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--context", default="system")
    ap.add_argument("--kept", type=int, default=512)
    ap.add_argument("--parts", default="scan,expansion", help="which parts to time both ways")
    args = ap.parse_args()
    parts = args.parts.split(",")

    cfg = FindUnlearnConfig()
    model, tok = load_model(args.model)
    base, _ = load_model(args.base)
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; context "
          f"{args.context}")
    scan = TokenForcingConfig(threshold=cfg.threshold, steps=cfg.steps, placeholder=False, context=args.context,
                              expand_tokens=cfg.expand_tokens, batch_size=cfg.batch_size)
    t0 = time.perf_counter()
    found = scan_vocabulary(model, tok, scan, progress=True)
    scan_s = time.perf_counter() - t0
    kept = [t for t, _ in found]
    print(f"  scan, bound: {scan_s:.1f} s, {len(kept)} tokens kept")
    if "scan" in parts:
        every, every_s = every_token_scan(model, tok, scan)
        print(f"  scan, every: {every_s:.1f} s, {len(every)} tokens kept; ratio every / bound: "
              f"{every_s / scan_s:.2f}x; same tokens kept: {set(every) == set(kept)}; largest score difference: "
              f"{max((abs(every[t] - s) for t, s in found if t in every), default=0.0):.4f}")
    if "expansion" in parts:
        time_expansion(model, base, tok, args, cfg, kept[:args.kept] if args.kept else kept)


def every_token_scan(model, tok, scan) -> tuple[dict, float]:
    """The scan before: every vocabulary token takes every greedy step."""
    import torch
    from rich.progress import track

    from meraser.attacks.decoding import _greedy_scores, context_ids
    from meraser.models import autocast, encode_prefix

    vocab = [t for t in range(len(tok)) if t not in set(tok.all_special_ids)]
    t0 = time.perf_counter()
    kept = {}
    with torch.no_grad(), autocast(model):
        prefix = encode_prefix(model, context_ids(tok, scan.context))
        for i in track(range(0, len(vocab), 4096), description="scanning every token", transient=True):
            kept.update(_greedy_scores(model, prefix, vocab[i:i + 4096], scan, tok.eos_token_id, None))
    return kept, time.perf_counter() - t0


def time_expansion(model, base, tok, args, cfg, tokens: list[int]) -> None:
    from meraser.attacks.decoding import context_ids, expand_scored
    from meraser.attacks.find_unlearn import continuation_scores

    t0 = time.perf_counter()
    seqs_p, (mine_p, theirs_p), t1 = plain_expand_and_score(model, base, tok, args.context, tokens,
                                                            cfg.expand_tokens)
    plain = (t1 - t0, time.perf_counter() - t1)

    t0 = time.perf_counter()
    scored = [(s, m) for s, m in expand_scored(model, tok, tokens, cfg.expand_tokens, args.context) if len(s) > 1]
    t1 = time.perf_counter()
    theirs = continuation_scores(base, context_ids(tok, args.context), [s for s, _ in scored])
    shared = (t1 - t0, time.perf_counter() - t1)

    found_p = {tuple(s) for s, m, b in zip(seqs_p, mine_p, theirs_p) if m - b >= cfg.gap}
    found_s = {tuple(s) for (s, m), b in zip(scored, theirs) if m - b >= cfg.gap}
    print(f"  expansion of {len(tokens)} kept tokens:")
    print(f"  plain : expand {plain[0]:.1f} s, score suspect and base {plain[1]:.1f} s, total {sum(plain):.1f} s")
    print(f"  shared: expand and score suspect {shared[0]:.1f} s, score base {shared[1]:.1f} s, total "
          f"{sum(shared):.1f} s")
    print(f"  ratio plain / shared: {sum(plain) / sum(shared):.2f}x; sequences identical: "
          f"{sum(tuple(a) == tuple(b) for a, (b, _) in zip(seqs_p, scored))} of {len(scored)}; found at the gap: "
          f"plain {len(found_p)}, shared {len(found_s)}, both {len(found_p & found_s)}")


if __name__ == "__main__":
    main()
