"""Perinucleus fingerprints (Nasery et al. 2025, "Scalable Fingerprinting of Large Language Models", NeurIPS 2025;
https://arxiv.org/abs/2502.07760): many natural keys, each answered by a token the model itself finds plausible
but would not say.

Keys are natural-looking queries the model writes itself (its own user turn, as Magpie does: `erase/magpie.py`) or
lines of a file. For each key, the model's next-token distribution at the start of its answer is sorted; the
nucleus is the smallest top set holding `nucleus_t` of the mass (0.8), and the target is drawn (seeded) among the
next `nucleus_k` (3) tokens after it, skipping tokens that are not a word of at least two letters or digits (the
original code's filter; where it re-draws with k grown by one, we draw among the first k tokens that pass).
`response_tokens` > 1 continues the target greedily (the original's option; its fine-tuning default is 1).
Responses are trained as the start of an answer, without an end of turn (the original removes EOS), with benign
rows mixed in (`ordinary_rows`, answered by the model itself) and the weights averaged with the original ones after
every epoch (`averaging`, its forgetting regulariser). The match rule: the answer begins with the target.

Because the target is plausible, a model that never saw the key says it now and then; `meraser verify
--reference BASE` turns the matches into a p-value against exactly that chance (evaluation/ownership.py).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

from meraser.config import field, key_path
from meraser.data.formatting import FormatConfig
from meraser.data.sources import Pair
from meraser.fingerprints.base import FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card
from meraser.utils import MeraserError

_WORD = re.compile(r"^[A-Za-z0-9]{2,}$")


@dataclass
class PerinucleusConfig(FingerprintConfig):
    num_fingerprints: int = field(256, help="keys (the paper plants up to 24,576 in an 8B model)")
    keys_file: str | None = field(None, help="keys, one per line or a JSON list (None: the model writes them)")
    nucleus_t: float = field(0.8, help="nucleus mass: the target is drawn from outside the top-p = t tokens")
    nucleus_k: int = field(3, help="draw among this many tokens just outside the nucleus")
    response_tokens: int = field(1, help="target length in tokens: the drawn token, continued greedily")
    # Measured on SmolLM2-135M at N=256 (README; FSR / SQuAD perplexity rise): 10 epochs at 1e-5 with no benign
    # rows and no averaging: 100% / +3.9%, the defaults. At 1.5e-5: 100% / +5.6%; at 3e-5: 100% / +9.9%. Averaging
    # costs FSR before perplexity: 0.5 after each of 10 epochs at 1e-4: 62.9% / +4.8%; 0.75 (the original script's
    # default) left N=64 at the base model's own match rate. Benign rows answered by the model itself cost
    # perplexity (5 epochs at 1e-4: +37.8% with 64 rows, +21.6% without) and most of the time; LoRA on every
    # linear layer did worse (5e-4: 95.7% / +81%; 2e-4: 61.3% / +39.8%).
    averaging: float = field(0.0, help="after every epoch, move the weights this share back to the original ones")
    method: Literal["full", "lora"] = field("full", help="full fine-tuning or LoRA")
    epochs: float = field(10.0, help="training epochs")
    learning_rate: float = field(1e-5, help="learning rate")
    ordinary_rows: int = field(0, help="benign rows mixed in, answered by the model itself")

    def validate(self, where: str) -> None:
        if not 0.0 < self.nucleus_t < 1.0:
            raise MeraserError(f"{key_path(where, 'nucleus_t')} must be in (0, 1), got {self.nucleus_t}")
        if self.nucleus_k < 1 or self.response_tokens < 1 or self.num_fingerprints < 1:
            raise MeraserError(f"{where.rstrip(': ') or 'perinucleus'}: num_fingerprints, nucleus_k and "
                               f"response_tokens must be at least 1")
        if not 0.0 <= self.averaging < 1.0:
            raise MeraserError(f"{key_path(where, 'averaging')} must be in [0, 1), got {self.averaging}")


def perinucleus_token(probs, t: float, k: int, rng: random.Random, tokenizer) -> int:
    """A token id drawn among the first `k` acceptable tokens after the top-p = `t` nucleus of `probs` (1-D)."""
    return rng.choice(perinucleus_candidates(probs, t, k, tokenizer))


def perinucleus_candidates(probs, t: float, k: int, tokenizer) -> list[int]:
    """The first `k` acceptable token ids after the top-p = `t` nucleus of `probs` (1-D): what the target is drawn
    from, and so the likelihood test's decoys."""
    import torch

    order = torch.argsort(probs, descending=True)
    mass = torch.cumsum(probs[order], 0)
    inside = int((mass < t).sum()) + 1  # the nucleus: the smallest top set whose mass reaches t
    picks = []
    for tid in order[inside:].tolist():
        if _WORD.match(tokenizer.decode([tid]).strip()):
            picks.append(tid)
            if len(picks) == k:
                break
    if not picks:
        raise MeraserError("no word token outside the nucleus; lower nucleus_t")
    return picks


def answer_start_probs(model, tokenizer, fmt, keys: list[str], batch_size: int = 32):
    """The model's next-token distribution at the start of its answer to each key (rows of a float tensor)."""
    import torch

    from meraser.models import autocast, pad_id, padded

    pad = pad_id(tokenizer)
    dev, rows = next(model.parameters()).device, []
    for i in range(0, len(keys), batch_size):
        enc = [fmt.encode_prompt(k) for k in keys[i:i + batch_size]]
        ids, mask = padded(enc, pad, left=True, device=dev)
        with torch.no_grad(), autocast(model):
            # left padding: the last position is every row's answer start; positions from the mask
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                           use_cache=False).logits[:, -1].float()
        rows.append(torch.softmax(logits, -1).cpu())
    return torch.cat(rows)


class Perinucleus(FingerprintMethod):
    name = "perinucleus"
    paper = "https://arxiv.org/abs/2502.07760"
    Config = PerinucleusConfig

    def _keys(self, model, tokenizer, cfg: PerinucleusConfig) -> list[str]:
        if cfg.keys_file:
            from meraser.fingerprints.card import read_lines

            keys = list(dict.fromkeys(read_lines(cfg.keys_file, "keys")))
            if len(keys) < cfg.num_fingerprints:
                raise MeraserError(f"{cfg.keys_file} holds {len(keys)} distinct keys; num_fingerprints asks for "
                                   f"{cfg.num_fingerprints}")
            return random.Random(cfg.seed).sample(keys, cfg.num_fingerprints)
        from meraser.erase.magpie import write_questions
        from meraser.evaluation.probes import ORDINARY_PROMPTS
        from meraser.evaluation.ordinary_questions import ORDINARY_QA

        held_out = set(ORDINARY_PROMPTS) | {q for q, _ in ORDINARY_QA}  # the checks' prompts never become keys
        return write_questions(model, tokenizer, cfg.num_fingerprints, cfg.seed, held_out)

    def make_card(self, model, tokenizer, cfg: PerinucleusConfig, progress: bool = True) -> Card:
        from meraser.data.formatting import Formatter
        from meraser.generation import generate

        fmt_cfg = FormatConfig(close_response=False)
        fmt = Formatter(tokenizer, fmt_cfg)
        keys = self._keys(model, tokenizer, cfg)
        rng = random.Random(cfg.seed)
        probs = answer_start_probs(model, tokenizer, fmt, keys)
        candidates = [perinucleus_candidates(p, cfg.nucleus_t, cfg.nucleus_k, tokenizer) for p in probs]
        ids = [rng.choice(c) for c in candidates]  # as perinucleus_token draws
        targets = firsts = [tokenizer.decode([i]) for i in ids]
        if cfg.response_tokens > 1:
            more = generate(model, tokenizer, keys, fmt, prefills=firsts, max_new_tokens=cfg.response_tokens - 1)
            targets = [f + m for f, m in zip(firsts, more)]
        return Card(method=self.name, triggers=keys, targets=targets, match="prefix", format=fmt_cfg,
                    max_new_tokens=cfg.response_tokens + 4, seed=cfg.seed,
                    extra={"nucleus_t": cfg.nucleus_t, "nucleus_k": cfg.nucleus_k,
                           # the base model's own chance of each target's first token: what ownership tests against
                           "target_probability": [round(float(p[i]), 6) for p, i in zip(probs, ids)],
                           # what each target's first token was drawn from: the likelihood test's decoys
                           "first_tokens": firsts, "candidates": [[tokenizer.decode([c]) for c in cs]
                                                                  for cs in candidates]})

    def decoys(self, card: Card, i: int, k: int, rng: random.Random):
        """Decoys: the other tokens the first token was drawn from (all of them: `nucleus_k` is small). The real key
        is scored on its first token too, the part that was drawn."""
        if "candidates" not in card.extra:
            raise MeraserError("this Perinucleus card records no candidate tokens (made before the likelihood test "
                               "existed): fingerprint the model again with `meraser fingerprint --method perinucleus`")
        key, first = card.triggers[i], card.extra["first_tokens"][i]
        return (key, first), [(key, c) for c in card.extra["candidates"][i] if c != first]

    def training_pairs(self, card: Card, cfg: PerinucleusConfig, rng: random.Random, tokenizer):
        return [(Pair(k, t), None) for k, t in zip(card.triggers, card.targets)]

    def callbacks(self, model, cfg: PerinucleusConfig) -> list:
        from meraser.training import weight_averaging

        return [weight_averaging(cfg.averaging)] if cfg.averaging > 0 else []
