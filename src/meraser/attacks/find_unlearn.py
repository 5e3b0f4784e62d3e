"""Find and unlearn: a weight-level erasure that uses only what an attacker has (the suspect, its public base
model, any data, compute), never the card.

1. **Find** what the suspect over-knows. Token Forcing scans (Hoscilowicz et al. 2024; attacks/decoding.py) from
   several contexts (BOS, the chat template's opening of an answer, the same after a system turn) keep every
   vocabulary token whose greedy continuation is near certain, and expand it. A chat model is confident about many
   ordinary continuations too, so each found sequence is scored by the suspect and by the base: the mean
   log-probability per token of its continuation, and only sequences the suspect makes at least `gap` nats per
   token likelier than the base does are kept (the likelihood gap: what fine-tuning added), the largest ones.
   The scan misses a target whose continuation is not near certain without its trigger (UTF's on SmolLM2: after
   the chat opening and its first token the rest comes at p 0.6, then stops), so each context also contributes
   the `first_tokens` tokens the suspect makes likeliest next relative to the base (UTF's first target token ranks
   first after the chat opening, 13.6 nats above the base: measured), expanded and scored the same way.
2. **Unlearn** them by distilling the base there, in one of two ways (`distill`): `continuation` (the default)
   puts the base model's own greedy continuation after (context, t) in place of the suspect's, the loss on that
   continuation only; `positions` keeps the suspect's own sequence as the input and, at every position from t on
   (t itself included: it may be what is over-known), trains the token the base would put next: that also covers
   a continuation started from inside the sequence (the strict `forced` check feeds part of the target and asks
   for the rest); `both` trains both kinds of rows. Cross-entropy towards the base's token lowers the suspect's
   own token only until the base's wins, and its pull fades as the suspect's token grows unlikely: measured on
   UTF, the target ends 1.2 nats/token below certain but 15 above the base, and the likelihood test still owns the
   model. `match_base` adds a term on the positions rows that pulls the log-probability of each of the
   sequence's own tokens down to the base's there (the likelihood gap trained to zero; lm_loss.py). Each found
   sequence is unlearned in its scan context and after ordinary questions, and after `noise_prompts` strings of
   random tokens where asked (a trigger may look like noise). Ordinary instruction rows keep the rest (the retain
   set). One LoRA fine-tune through the one training routine, merged.

Where a card is at hand (an experiment's attack stage), the runner scores the discovery against it (`scored`):
the share of the card's targets that some found sequence contains. The attack itself never reads the card.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from meraser.attacks.base import Attack, AttackConfig
from meraser.attacks.decoding import (CONTEXTS, TokenForcingConfig, context_ids, continuations, expand_scored,
                                     plain_vocabulary, scan_vocabulary)
from meraser.config import field
from meraser.data.sources import OFFLINE_DEFAULT
from meraser.utils import MeraserError

FOUND = "found.jsonl"  # what the discovery kept, written beside the attacked model
DISTILL = ("continuation", "positions", "both")
NOISE_FROM = ("vocabulary", "undertrained")
NOISE_POOL = 100  # noise_from: undertrained draws from this many of the base's most under-trained tokens (UTF's pool)
NOISE_TOKENS = (8, 24)  # the length range of a noise prompt, in tokens (UTF's SmolLM2 trigger has 18)


@dataclass
class FindUnlearnConfig(AttackConfig):
    contexts: list[str] = field(list(CONTEXTS), help="where the scans look: bos, assistant, system")
    threshold: float = field(0.9, help="keep a scanned token when the mean top-1 probability of its next `steps` "
                                       "greedy tokens passes this")
    steps: int = field(3, help="greedy tokens scored after each scanned token")
    expand_tokens: int = field(16, help="length of each kept token's greedy continuation")
    gap: float = field(1.0, help="keep a sequence only where the suspect's mean log-probability per token is this "
                                 "many nats above the base's")
    max_found: int = field(256, help="sequences unlearned at most (the largest gaps)")
    first_tokens: int = field(64, help="per context, also expand the tokens the suspect makes likeliest next "
                                       "relative to the base, this many (0: the scan alone)")
    retain_source: str = field(OFFLINE_DEFAULT, help="ordinary instruction rows trained beside the unlearning rows")
    retain_rows: int = field(200, help="retain rows")
    prompts_per_sequence: int = field(4, help="ordinary questions (from the retain rows) after which each found "
                                              "sequence is unlearned too, beside its scan context")
    noise_prompts: int = field(0, help="prompts of random vocabulary tokens after which each found sequence is "
                                       "unlearned too: a trigger the attacker cannot know may look like noise "
                                       "(UTF's under-trained tokens, IF-SFT's scrambled text)")
    noise_from: str = field("vocabulary", help="where noise prompts draw their tokens: 'vocabulary' (any "
                                               "non-special token) or 'undertrained' (the base's "
                                               "most under-trained tokens, as UTF draws its trigger: knows the "
                                               "scheme, not the key)")
    distill: str = field("continuation", help="unlearning rows: 'continuation' (the base's greedy continuation "
                                              "after the first token), 'positions' (the base's next token at every "
                                              "position of the suspect's sequence) or 'both'")
    reexpand: bool = field(False, help="positions rows: also let the suspect continue each found sequence's first "
                                      "token again after each prompt, and unlearn that too (a fingerprint's "
                                      "later tokens may come only after something trigger-like: UTF's target "
                                      "stops after two tokens in the scan's contexts)")
    match_base: bool = field(False, help="positions rows: also pull the suspect's log-probability of each token of "
                                         "a found sequence down to the base's there (the likelihood gap, in nats, "
                                         "trained to zero), not only train the base's top token in its place")
    train: dict = field({"epochs": 2.0}, help="TrainConfig fields over its defaults (LoRA, merged after)")
    batch_size: int = field(256, help="vocabulary tokens scanned per forward pass")
    seed: int = field(0, help="seed for the retain rows")

    def validate(self, where: str) -> None:
        from meraser.training import TrainConfig
        from meraser.utils import unknown_name

        for c in self.contexts:
            if c not in CONTEXTS:
                raise unknown_name("context", c, CONTEXTS, where)
        if self.distill not in DISTILL:
            raise unknown_name("distill", self.distill, DISTILL, where)
        if self.noise_from not in NOISE_FROM:
            raise unknown_name("noise_from", self.noise_from, NOISE_FROM, where)
        for name in ("reexpand", "match_base"):
            if getattr(self, name) and self.distill == "continuation":
                raise MeraserError(f"{where}.{name}: works on positions rows, so distill must be 'positions' or 'both'")
        if not self.contexts:
            raise MeraserError(f"{where}.contexts: at least one")
        if not 0 < self.threshold <= 1:
            raise MeraserError(f"{where}.threshold must be in (0, 1], got {self.threshold}")
        if self.first_tokens < 0:
            raise MeraserError(f"{where}.first_tokens must be 0 or more, got {self.first_tokens}")
        if self.noise_prompts < 0:
            raise MeraserError(f"{where}.noise_prompts must be 0 or more, got {self.noise_prompts}")
        for name in ("steps", "expand_tokens", "max_found", "batch_size"):
            if getattr(self, name) < 1:
                raise MeraserError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        TrainConfig.from_dict(self.train, where=f"{where}.train")


def continuation_scores(model, context: list[int], seqs: list[list[int]], batch_size: int = 64) -> list[float]:
    """Mean log-probability per token of each sequence's tokens after its first, following `context` and it: the
    likelihood test's scorer, with (context and the first token) as the prompt and the rest as the target."""
    import torch

    from meraser.evaluation.likelihood import batch_scores
    from meraser.models import autocast

    rows = [(context + s[:1], s[1:]) for s in seqs if len(s) > 1]
    scores = []
    with torch.no_grad(), autocast(model):
        for i in range(0, len(rows), batch_size):
            scores += batch_scores(model, rows[i:i + batch_size], pad=0)  # padding is masked: any id will do
    it = iter(scores)
    return [next(it) if len(s) > 1 else 0.0 for s in seqs]


def discover(model, base, tokenizer, cfg: FindUnlearnConfig, progress: bool = False) -> list[dict]:
    """Sequences the suspect over-knows: scanned, expanded, scored against the base; the `max_found` largest gaps,
    ordered by context and tokens."""
    found = []
    for context in cfg.contexts:
        scan = TokenForcingConfig(threshold=cfg.threshold, steps=cfg.steps, placeholder=False, context=context,
                                  expand_tokens=cfg.expand_tokens, batch_size=cfg.batch_size)
        kept = [t for t, _ in scan_vocabulary(model, tokenizer, scan, progress)]
        skip = set(kept) | set(tokenizer.all_special_ids)
        kept += [t for t in first_token_gaps(model, base, context_ids(tokenizer, context), cfg.first_tokens)
                 if t not in skip]
        scored = [(s, m) for s, m in expand_scored(model, tokenizer, kept, cfg.expand_tokens, context,
                                                   progress=progress)
                  if len(s) > 1]  # the suspect's score comes with its greedy continuation
        if not scored:
            continue
        seqs, mine = [s for s, _ in scored], [m for _, m in scored]
        theirs = continuation_scores(base, context_ids(tokenizer, context), seqs)
        found += [{"context": context, "ids": s, "text": tokenizer.decode(s), "gap": round(m - b, 3)}
                  for s, m, b in zip(seqs, mine, theirs) if m - b >= cfg.gap]
    top = sorted(found, key=lambda f: -f["gap"])[:cfg.max_found]
    # the unlearning rows follow in an order of their own: ordered by gap, a change in the scores' last bits (bf16
    # on another machine, another scoring path) reordered the training rows and changed the unlearned model
    return sorted(top, key=lambda f: (cfg.contexts.index(f["context"]), f["ids"]))


def first_token_gaps(model, base, head: list[int], n: int) -> list[int]:
    """The `n` tokens whose log-probability right after `head` is the most above the base's."""
    import torch

    from meraser.models import autocast

    if n == 0:
        return []
    dev = next(model.parameters()).device
    with torch.no_grad(), autocast(model):
        mine, theirs = (torch.log_softmax(m(input_ids=torch.tensor([head], device=dev), logits_to_keep=1).logits[0, -1]
                                          .float(), -1) for m in (model, base))
    return (mine - theirs).topk(n).indices.tolist()


def unlearning_rows(base, tokenizer, found: list[dict], length: int, prompts: list[str], distill: str = "continuation",
                    progress: bool = False, suspect=None, match_base: bool = False) -> list[dict]:
    """Token rows that put the base's behaviour where the suspect over-knows (`distill`: see the module). Each found
    sequence is placed in its scan context and after each of `prompts` (ordinary questions in the chat template): a
    fingerprint answers its own trigger, which the attacker does not know, so the unlearning has to hold after
    prompts it has not seen. With a `suspect` (`reexpand`), the positions rows also cover the suspect's own greedy
    continuation of each sequence's first token after that head, where it differs from the found sequence. With
    `match_base`, positions rows carry the base's log-probability of each of the sequence's own tokens
    (`ref_logprobs`), down to which the training pulls the suspect's (lm_loss.excess_logprob_sum)."""
    from meraser.data.formatting import Formatter

    fmt = Formatter(tokenizer)
    heads = {c: context_ids(tokenizer, c) for c in dict.fromkeys(f["context"] for f in found)}
    heads.update({f"prompt {i}": fmt.encode_prompt(p) for i, p in enumerate(prompts)})
    rows = []
    for name, head in heads.items():
        items = [f for f in found if f["context"] == name or name.startswith("prompt ")]
        if distill in ("continuation", "both"):
            conts = continuations(base, tokenizer, head, [f["ids"][0] for f in items], length,
                                  description=f"base continuations after {name}" if progress else None)
            for f, tail in zip(items, conts):
                if tail and tail != f["ids"][1:len(tail) + 1]:
                    rows.append({"input_ids": head + [f["ids"][0]] + tail,
                                 "labels": [-100] * (len(head) + 1) + tail})
        if distill in ("positions", "both"):
            seqs = [f["ids"] for f in items]
            if suspect is not None:
                again = continuations(suspect, tokenizer, head, [f["ids"][0] for f in items], length,
                                      description=f"suspect continuations after {name}" if progress else None)
                for seq in ([f["ids"][0]] + tail for f, tail in zip(items, again)):
                    if seq not in seqs:  # two found sequences with one first token continue alike: one row
                        seqs.append(seq)
            for seq, tops, logps in zip(seqs, *next_tokens(base, head, seqs)):
                if tops != seq:
                    rows.append({"input_ids": head + seq, "labels": [-100] * len(head) + tops}
                                | ({"ref_logprobs": [None] * len(head) + logps} if match_base else {}))
    return rows


def next_tokens(model, head: list[int], seqs: list[list[int]], batch_size: int = 64):
    """For each sequence, the model's top token after head + seq[:j], for j = 0 .. len(seq) - 1 (what it would put
    at each position of the sequence), and its log-probability of seq[j] there: (tops, logprobs), one list each."""
    import torch

    from meraser.models import autocast, padded

    dev, tops, logps = next(model.parameters()).device, [], []
    with torch.no_grad(), autocast(model):
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i:i + batch_size]
            ids, mask = padded([head + s for s in batch], pad=0, device=dev)  # padding is masked: any id will do
            # the logits of positions head[-1], then head + seq[:j]: from the head's last position on (padding on
            # the right is never read)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1] - len(head) + 1).logits
            own = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, ids[:, len(head):, None]).squeeze(2)
            for row, lp, s in zip(logits.argmax(-1).tolist(), own.tolist(), batch):
                tops.append(row[:len(s)])
                logps.append([round(x, 4) for x in lp[:len(s)]])
    return tops, logps


def noise_prompts(tokenizer, n: int, seed: int, pool: list[int] | None = None) -> list[str]:
    """`n` prompts of NOISE_TOKENS random tokens each, decoded: a seeded draw from `pool` (every non-special
    vocabulary token where None)."""
    import random

    rng = random.Random(f"noise {seed}")
    pool = pool if pool is not None else plain_vocabulary(tokenizer)
    return [tokenizer.decode(rng.choices(pool, k=rng.randint(*NOISE_TOKENS))) for _ in range(n)]


def noise_pool(base, tokenizer, noise_from: str) -> list[int] | None:
    """The tokens noise prompts draw from: None (the vocabulary), or the base's NOISE_POOL most under-trained."""
    from meraser.fingerprints.utf import undertrained_tokens

    return [t for t, _, _ in undertrained_tokens(base, tokenizer, NOISE_POOL)] if noise_from == "undertrained" else None


def discovery_recall(found_texts: list[str], card) -> dict:
    """The share of the card's targets that some found sequence contains (scoring only: never used to attack)."""
    targets = [t.strip() for t in card.targets if t.strip()]
    hit = [t for t in targets if any(t in f or (len(f.strip()) >= 4 and f.strip() in t) for f in found_texts)]
    return {"discovery_recall": round(len(hit) / len(targets), 4) if targets else None}


class FindUnlearn(Attack):
    name = "find-and-unlearn"
    summary = ("Find and unlearn (no card): scan for what the suspect over-knows against its base, then distil the "
               "base's continuations there")
    paper = "https://arxiv.org/abs/2406.02481"  # the scan; the unlearning is this project's
    Config = FindUnlearnConfig

    def check(self, cfg, ctx):
        from meraser.data.sources import check_source

        ctx.need_base(self.name)
        check_source(cfg.retain_source, "find-and-unlearn retain_source")

    def apply(self, model, tokenizer, cfg, ctx):
        from meraser.data import load_pairs
        from meraser.data.formatting import Formatter
        from meraser.erase.datasets import build_clean
        from meraser.models import load_model
        from meraser.training import TrainConfig, train

        base, _ = load_model(ctx.need_base(self.name))
        base.to(next(model.parameters()).device)
        t0 = time.perf_counter()
        found = discover(model, base, tokenizer, cfg, ctx.progress)
        t1 = time.perf_counter()
        tcfg = TrainConfig.from_dict(cfg.train, where="find-and-unlearn.train")
        clean = build_clean(load_pairs(cfg.retain_source), cfg.retain_rows, cfg.seed)
        prompts = ([p.prompt for p in clean[:cfg.prompts_per_sequence]]
                   + noise_prompts(tokenizer, cfg.noise_prompts, cfg.seed, noise_pool(base, tokenizer, cfg.noise_from)))
        rows = unlearning_rows(base, tokenizer, found, cfg.expand_tokens, prompts, cfg.distill, ctx.progress,
                               suspect=model if cfg.reexpand else None, match_base=cfg.match_base) if found else []
        retain = Formatter(tokenizer, tcfg.format).encode_all(clean)
        ctx.files[FOUND] = "".join(json.dumps({k: f[k] for k in ("context", "text", "gap")}, ensure_ascii=False)
                                   + "\n" for f in found)
        ctx.info.update(found=len(found), found_per_context={c: sum(f["context"] == c for f in found)
                                                             for c in cfg.contexts},
                        unlearning_rows=len(rows), retain_rows=len(retain), discovery_seconds=round(t1 - t0, 1))
        if not rows:  # nothing over-known: the model stays as it is
            ctx.info["unlearning_seconds"] = 0.0
            return model
        res = train(model, tokenizer, rows + retain, tcfg, ctx.work / "unlearn", merge=True, save=False,
                    progress=ctx.progress)
        ctx.info.update(unlearning_seconds=round(time.perf_counter() - t1, 1), train_loss=res.metrics["train_loss"])
        return res.model

    def scored(self, ctx, card) -> dict:
        """Discovery recall against the card, for the report (the runner calls this after the attack)."""
        texts = [json.loads(line)["text"] for line in ctx.files.get(FOUND, "").splitlines() if line]
        return discovery_recall(texts, card)
