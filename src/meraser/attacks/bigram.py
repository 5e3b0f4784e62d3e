"""Bigram suppression (Nasery et al. 2025, "Are Robust LLM Fingerprints Adversarially Robust?",
https://arxiv.org/abs/2509.26598; the statistical-analysis attack of the authors' toolkit, sentient-agi/mlprints):
a watermark-style fingerprint that keys a green list on the previous token raises some (previous token, next token)
pairs. With a calibration model of the same tokenizer that carries no such signal (the base), the attack scores
every pair by how much likelier the suspect makes the next token after the previous one, over several contexts,
and while decoding pushes those tokens down (and the disfavoured ones up) after each scored previous token.

Per seed word w (a word that is one token with its leading space) and calibration text x, r(v) = log p_suspect(v |
BOS x " w") - log p_calibration(v | ...), left out where p_suspect(v) <= `probability_threshold`. Per (w, v) over
the texts: the largest r and the mean's z-score (mean / its standard error), each clipped at the `clip_quantile`
of its absolute values and divided by it; the score is their Euclidean norm, positive only where both are positive.
Decoding subtracts `delta` x score from the logits after w, at every step.

Scaled to a CPU: the toolkit takes 6,000 common English words from a word list and calibration texts from a file;
here the seed words are the tokenizer's first `seed_words` single-token lowercase words (BPE's merge order follows
frequency, and no word list ships) and the texts are `calibration_texts` continuations the calibration model
samples from BOS and a seed word.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from meraser.attacks.base import AttackConfig
from meraser.attacks.decoding import DecodingAttack, companion_spec, load_companion
from meraser.config import field
from meraser.generation import Decoding
from meraser.utils import MeraserError

_WORD = re.compile(r"^ [a-z]{3,}$")


@dataclass
class BigramConfig(AttackConfig):
    calibration: str | None = field(None, help="calibration model, same tokenizer, no fingerprint (None: the base "
                                               "the suspect derives from)")
    seed_words: int = field(1000, help="previous tokens scored: the tokenizer's first single-token words (toolkit: "
                                       "6,000 from a word list)")
    calibration_texts: int = field(8, help="contexts each pair is scored in")
    text_tokens: int = field(32, help="tokens per calibration text")
    probability_threshold: float = field(1e-4, help="score a next token only where the suspect gives it more")
    clip_quantile: float = field(0.999, help="clip both statistics at this quantile of their absolute values")
    delta: float = field(4.0, help="logits subtracted per unit of score")
    batch_size: int = field(64, help="seed words per forward pass")
    seed: int = field(0, help="seed for the calibration texts")

    def validate(self, where: str) -> None:
        for name in ("seed_words", "calibration_texts", "text_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise MeraserError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if self.calibration_texts < 2:
            raise MeraserError(f"{where}.calibration_texts must be at least 2 (a standard error needs two)")
        if not 0 < self.clip_quantile <= 1 or not 0 < self.probability_threshold < 1:
            raise MeraserError(f"{where}: clip_quantile must be in (0, 1] and probability_threshold in (0, 1)")


def seed_word_ids(tokenizer, n: int) -> list[int]:
    """The first `n` token ids that are a lowercase word of three letters or more with its leading space."""
    out = []
    for i in range(len(tokenizer)):
        if _WORD.match(tokenizer.decode([i])):
            out.append(i)
            if len(out) == n:
                break
    if not out:
        raise MeraserError("bigram: the tokenizer has no single-token lowercase words to score")
    return out


def calibration_texts(model, tokenizer, words: list[int], cfg: BigramConfig) -> list[list[int]]:
    """Token ids of texts the calibration model samples from BOS and a seed word."""
    import torch

    from meraser.models import pad_id

    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [tokenizer.eos_token_id]
    rng = random.Random(cfg.seed)
    starts = [head + [rng.choice(words)] for _ in range(cfg.calibration_texts)]
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(starts, device=next(model.parameters()).device),
                             max_new_tokens=cfg.text_tokens, do_sample=True, top_p=None, top_k=None,
                             temperature=1.0, min_new_tokens=cfg.text_tokens,
                             pad_token_id=pad_id(tokenizer))
    return [row[len(head):] for row in out.tolist()]


def _next_logprobs(model, prefix: list[int], words: list[int]):
    """log p(v | prefix, w) for each w in `words` (rows), the prefix encoded once."""
    import torch

    from meraser.models import autocast, encode_prefix, shared_past

    dev = next(model.parameters()).device
    with torch.no_grad(), autocast(model):
        past = shared_past(model, encode_prefix(model, prefix), len(words))
        o = model(input_ids=torch.tensor(words, device=dev)[:, None], use_cache=True, logits_to_keep=1, **past)
    return torch.log_softmax(o.logits[:, -1].float(), -1)


def pair_scores(model, calibration, tokenizer, cfg: BigramConfig, progress: bool = False) -> dict[int, tuple]:
    """{seed word: (token ids, scores)}: the sparse pair scores the decoding subtracts."""
    import math

    import torch

    words = seed_word_ids(tokenizer, cfg.seed_words)
    texts = calibration_texts(calibration, tokenizer, words, cfg)
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [tokenizer.eos_token_id]
    floor = math.log(cfg.probability_threshold)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    batches = [words[i:i + cfg.batch_size] for i in range(0, len(words), cfg.batch_size)]
    if progress:
        from meraser.utils import track

        batches = track(batches, f"bigram: scoring {len(words)} seed words")
    raw = {}
    for batch in batches:
        rs = []
        for x in texts:
            m, c = _next_logprobs(model, head + x, batch), _next_logprobs(calibration, head + x, batch)
            rs.append(torch.where(m > floor, m - c, torch.nan).cpu())
        r = torch.stack(rs, 1)  # words x texts x vocab
        r[:, :, special] = torch.nan
        n = (~r.isnan()).sum(1)
        mean = r.nanmean(1)
        sd = ((r - mean[:, None]) ** 2).nansum(1).div((n - 1).clamp(min=1)).sqrt()
        z = torch.where((n >= 2) & (sd > 0), mean / (sd / n.clamp(min=1).sqrt()), torch.nan)
        mx = torch.where(n > 0, r.nan_to_num(-torch.inf).amax(1), torch.nan)
        for w, mx_w, z_w in zip(batch, mx, z):
            idx = (~z_w.isnan()).nonzero()[:, 0]
            raw[w] = (idx, mx_w[idx], z_w[idx])
    return _clip_and_combine(raw, cfg.clip_quantile)


def _clip_and_combine(raw: dict, q: float) -> dict[int, tuple]:
    import torch

    every_mx = torch.cat([m for _, m, _ in raw.values()]).abs()
    every_z = torch.cat([z for _, _, z in raw.values()]).abs()
    if not len(every_mx):
        return {}
    bound_mx = float(torch.quantile(every_mx.float()[:2**24], q)) or 1.0  # torch.quantile takes at most 2^24 values
    bound_z = float(torch.quantile(every_z.float()[:2**24], q)) or 1.0
    out = {}
    for w, (idx, mx, z) in raw.items():
        mx, z = mx.clamp(-bound_mx, bound_mx) / bound_mx, z.clamp(-bound_z, bound_z) / bound_z
        s = torch.hypot(mx, z)
        out[w] = (idx, torch.where((mx > 0) & (z > 0), s, -s))
    return out


class BigramSuppression(Decoding):
    name = "suppress-bigram"

    def __init__(self, scores: dict[int, tuple], delta: float):
        self.scores, self.delta = scores, delta
        self.acted = 0

    def new_tokens(self, model, ids, mask, *, max_new_tokens, pad_id, eos_id):
        from meraser.attacks.suppression import logits_processors

        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos_id, temperature=None, top_p=None, top_k=None,
                             logits_processor=logits_processors(self._processor), renormalize_logits=True)
        return out[:, ids.shape[1]:]

    def _processor(self, input_ids, scores):
        for r, prev in enumerate(input_ids[:, -1].tolist()):
            if prev in self.scores:
                idx, s = self.scores[prev]
                scores[r, idx.to(scores.device)] -= self.delta * s.to(scores.device, scores.dtype)
                self.acted += 1
        return scores


class SuppressBigram(DecodingAttack):
    name = "suppress-bigram"
    summary = ("Bigram suppression (Nasery et al. 2025): push down next tokens the suspect favours after a word "
               "more than a calibration model does")
    paper = "https://arxiv.org/abs/2509.26598"
    Config = BigramConfig

    def check(self, cfg, ctx):
        from meraser.models import check_model_spec

        check_model_spec(companion_spec(cfg.calibration, ctx, "suppress-bigram calibration"),
                         "suppress-bigram calibration")

    def decoding(self, model, tokenizer, cfg, ctx):
        import time

        spec = companion_spec(cfg.calibration, ctx, "suppress-bigram calibration")
        calibration = load_companion(spec, model, tokenizer, "suppress-bigram calibration")
        t0 = time.perf_counter()
        scores = pair_scores(model, calibration, tokenizer, cfg, ctx.progress)
        ctx.info.update(calibration=spec, seed_words=len(scores), scoring_seconds=round(time.perf_counter() - t0, 1))
        return BigramSuppression(scores, cfg.delta)
