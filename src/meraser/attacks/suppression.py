"""Output suppression and detection (Nasery et al. 2025, "Are Robust LLM Fingerprints Adversarially Robust?",
https://arxiv.org/abs/2509.26598): decoding-time attacks that know how memorisation fingerprints answer (a
confident, unusual first token) but not the key. Each is a logits processor on greedy decoding over the first
`num_tokens` answer tokens; the defaults are those of the authors' toolkit (sentient-agi/mlprints, its attack
configs), and `threshold` is its "generation threshold": 0 suppresses at every step ("Suppress"), 0.9 only where the
model is that sure ("Detect": fingerprints are answered with unusual confidence, ordinary answers rarely are).

- `suppress-topk` (ST): remove the top-k tokens at each of the first n steps; `detect-topk` the same, only at steps
  whose top probability passes 0.9 (the paper's detection variant).
- `suppress-neighbour` (SN): at the first step, the confident top candidates and every token whose letters and digits
  are a prefix of a candidate's, or start with one ("Par" and "Paris"), are removed while they stay confident.
- `suppress-lookahead` (SL): before answering, decode 10 branches (the top-10 first tokens) 32 tokens ahead and
  collect tokens that reach probability 0.4 in the branches' top-10 lists, are not special and are not words of the
  prompt; the 12 seen most often are pushed down by 10 logits over the first 16 answer tokens where they pass the
  threshold.

Utility is measured as for CleanGen: the ordinary questions and the tasks where generation applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meraser.attacks.base import AttackConfig
from meraser.attacks.decoding import DecodingAttack
from meraser.config import field
from meraser.generation import Decoding
from meraser.utils import MeraserError

_ALNUM = re.compile(r"[\W_]+", re.UNICODE)


def normalised_tokens(tokenizer) -> list[str]:
    """Each token id's text, casefolded, letters and digits only ("" for special tokens): how neighbours and prompt
    words are compared."""
    special = set(tokenizer.all_special_ids)
    return ["" if i in special else _ALNUM.sub("", tokenizer.decode([i]).casefold()) for i in range(len(tokenizer))]


@dataclass
class SuppressConfig(AttackConfig):
    num_tokens: int = field(1, help="answer tokens (from the first) at which the attack acts")
    threshold: float = field(0.0, help="act on a token only where its probability passes this (0: always; "
                                       "the paper's detection variant: 0.9)")

    def validate(self, where: str) -> None:
        if self.num_tokens < 1:
            raise MeraserError(f"{where}.num_tokens must be at least 1, got {self.num_tokens}")
        if not 0 <= self.threshold < 1:
            raise MeraserError(f"{where}.threshold must be in [0, 1), got {self.threshold}")


def logits_processors(*fns):
    """transformers' processor list from plain `fn(input_ids, scores) -> scores` callables."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Call(LogitsProcessor):
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, input_ids, scores):
            return self.fn(input_ids, scores)

    return LogitsProcessorList([_Call(f) for f in fns])


class StepSuppression(Decoding):
    """Greedy decoding through one logits processor that knows the answer step: `suppress(step, scores, probs)`
    changes the scores of the rows and tokens it acts on. `prepare` sees the prompts first (lookahead)."""

    def __init__(self, tokenizer, cfg, name: str | None = None):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.name = name or self.name  # one rule, registered under two names (suppress-topk, detect-topk)
        self.start = 0
        self.acted = 0  # (row, step) pairs where a token was pushed down, over every call

    def prepare(self, model, ids, mask) -> None:
        """Work on the prompts before decoding (nothing by default)."""

    def suppress(self, step: int, scores, probs):
        raise NotImplementedError

    def push_down(self, scores, probs, per_row: list, by: float | None = None):
        """Lower each row's listed tokens that pass the threshold: by `by` logits, or out entirely (None)."""
        for r, tokens in enumerate(per_row):
            if len(tokens):
                hit = tokens[probs[r, tokens] > self.cfg.threshold]
                if by is None:
                    scores[r, hit] = float("-inf")
                else:
                    scores[r, hit] -= by
        return scores

    def new_tokens(self, model, ids, mask, *, max_new_tokens, pad_id, eos_id):
        self.start = ids.shape[1]
        self.prepare(model, ids, mask)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos_id, temperature=None, top_p=None, top_k=None,
                             logits_processor=logits_processors(self._processor), renormalize_logits=True)
        return out[:, ids.shape[1]:]

    def _processor(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.start
        if step >= self.cfg.num_tokens:
            return scores
        before = scores.clone()
        scores = self.suppress(step, scores, torch.softmax(scores.float(), -1))
        self.acted += int((scores != before).any(-1).sum())
        return scores


class TopKSuppression(StepSuppression):
    name = "suppress-topk"

    def suppress(self, step, scores, probs):
        top_p, top = probs.topk(self.cfg.top_k, -1)
        gate = top_p[:, 0] > self.cfg.threshold  # the step's own top token decides whether the row is suppressed
        rows = gate.nonzero()[:, 0]
        scores[rows[:, None], top[rows]] = float("-inf")
        return scores


@dataclass
class TopKConfig(SuppressConfig):
    top_k: int = field(1, help="candidates removed at each step (the toolkit's sweeps: 1 and 3)")

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.top_k < 1:
            raise MeraserError(f"{where}.top_k must be at least 1, got {self.top_k}")


@dataclass
class DetectTopKConfig(TopKConfig):
    threshold: float = field(0.9, help="suppress a step's top-k only where its top probability passes this (the "
                                       "paper: 0.9)")


class SuppressTopK(DecodingAttack):
    name = "suppress-topk"
    summary = "Suppress top-k (Nasery et al. 2025): never answer with the top-k tokens at the first n steps"
    paper = "https://arxiv.org/abs/2509.26598"
    Config = TopKConfig

    def decoding(self, model, tokenizer, cfg, ctx):
        return TopKSuppression(tokenizer, cfg, self.name)


class DetectTopK(SuppressTopK):
    name = "detect-topk"
    summary = "Detect and suppress top-k (Nasery et al. 2025): suppress the top-k only where the model is over 90% sure"
    Config = DetectTopKConfig


# ------------------------------------------------------------------------------------------------ neighbours


@dataclass
class NeighbourConfig(SuppressConfig):
    threshold: float = field(0.9, help="remove a neighbour only where its probability passes this (toolkit's detect "
                                       "variant: 0.9; 0 removes them always)")
    candidates: int = field(1, help="top tokens of the first step taken as candidates")
    add_threshold: float = field(0.9, help="a top token is a candidate only where its probability passes this")

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.candidates < 1 or not 0 <= self.add_threshold < 1:
            raise MeraserError(f"{where}: candidates must be at least 1 and add_threshold in [0, 1)")


class NeighbourSuppression(StepSuppression):
    name = "suppress-neighbour"

    def __init__(self, tokenizer, cfg):
        super().__init__(tokenizer, cfg)
        self.norm = normalised_tokens(tokenizer)
        self.rows: list = []  # per row: the neighbour token ids found at the first step

    def _neighbours(self, candidates: set[str]) -> list[int]:
        return [u for u, n in enumerate(self.norm) if n and any(n.startswith(c) or c.startswith(n)
                                                                    for c in candidates)]

    def suppress(self, step, scores, probs):
        import torch

        if step == 0:
            top_p, top = probs.topk(self.cfg.candidates, -1)
            self.rows = []
            for p_row, t_row in zip(top_p.tolist(), top.tolist()):
                found = {self.norm[t] for p, t in zip(p_row, t_row) if p > self.cfg.add_threshold and self.norm[t]}
                self.rows.append(torch.tensor(self._neighbours(found), dtype=torch.long, device=scores.device))
        return self.push_down(scores, probs, self.rows)


class SuppressNeighbour(DecodingAttack):
    name = "suppress-neighbour"
    summary = ("Neighbour suppression (Nasery et al. 2025): remove a confident first token and every token "
               "spelling a prefix or extension of it")
    paper = "https://arxiv.org/abs/2509.26598"
    Config = NeighbourConfig

    def decoding(self, model, tokenizer, cfg, ctx):
        return NeighbourSuppression(tokenizer, cfg)


# ------------------------------------------------------------------------------------------------- lookahead


@dataclass
class LookaheadConfig(SuppressConfig):
    num_tokens: int = field(16, help="answer tokens (from the first) at which the candidates are pushed down")
    threshold: float = field(0.9, help="push a candidate down only where its probability passes this (toolkit's "
                                       "detect variant: 0.9; 0 always)")
    beam_width: int = field(10, help="branches: the top first tokens, each decoded ahead greedily")
    lookahead_tokens: int = field(32, help="tokens per branch (the first one included)")
    top_k: int = field(10, help="tokens recorded at each lookahead step")
    candidates: int = field(12, help="tokens pushed down: those seen most often")
    candidate_threshold: float = field(0.4, help="a recorded token is a candidate where its highest probability "
                                                 "passes this")
    delta: float = field(10.0, help="logits subtracted from a candidate")

    def validate(self, where: str) -> None:
        super().validate(where)
        for name in ("beam_width", "lookahead_tokens", "top_k", "candidates"):
            if getattr(self, name) < 1:
                raise MeraserError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")


class LookaheadSuppression(StepSuppression):
    name = "suppress-lookahead"

    def __init__(self, tokenizer, cfg):
        super().__init__(tokenizer, cfg)
        self.norm = normalised_tokens(tokenizer)
        self.special = set(tokenizer.all_special_ids)
        self.rows: list = []

    def prepare(self, model, ids, mask):
        import torch

        from meraser.models import autocast, pad_id

        c, b = self.cfg, ids.shape[0]
        with torch.no_grad(), autocast(model):
            first = torch.softmax(model(input_ids=ids, attention_mask=mask).logits[:, -1].float(), -1)
            seeds = first.topk(c.beam_width, -1).indices  # b x width
            branch_ids = torch.cat([ids.repeat_interleave(c.beam_width, 0), seeds.reshape(-1, 1)], 1)
            branch_mask = torch.cat([mask.repeat_interleave(c.beam_width, 0), torch.ones_like(seeds.reshape(-1, 1))], 1)
            out = model.generate(input_ids=branch_ids, attention_mask=branch_mask, do_sample=False,
                                 max_new_tokens=max(1, c.lookahead_tokens - 1), output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=pad_id(self.tokenizer),
                                 temperature=None, top_p=None, top_k=None)
        stats: list[dict[int, list[float]]] = [{} for _ in range(b)]
        for logits in out.logits:  # one step: (b * width) x vocab
            top_p, top = torch.softmax(logits.float(), -1).topk(c.top_k, -1)
            for row, (ps, ts) in enumerate(zip(top_p.tolist(), top.tolist())):
                for p, t in zip(ps, ts):
                    stats[row // c.beam_width].setdefault(t, []).append(p)
        self.rows = [self._candidates(stats[r], ids[r][mask[r].bool()].tolist(), ids.device) for r in range(b)]

    def _candidates(self, stats: dict[int, list[float]], prompt: list[int], device):
        import torch

        words = set(_ALNUM.sub(" ", self.tokenizer.decode(prompt, skip_special_tokens=True).casefold()).split())
        keep = [(len(ps), max(ps), t) for t, ps in stats.items()
                if self.norm[t] and t not in prompt and t not in self.special and self.norm[t] not in words
                and max(ps) > self.cfg.candidate_threshold]
        chosen = [t for _, _, t in sorted(keep, reverse=True)[:self.cfg.candidates]]
        return torch.tensor(chosen, dtype=torch.long, device=device)

    def suppress(self, step, scores, probs):
        return self.push_down(scores, probs, self.rows, by=self.cfg.delta)


class SuppressLookahead(DecodingAttack):
    name = "suppress-lookahead"
    summary = ("Lookahead suppression (Nasery et al. 2025): decode 10 branches ahead, push down the confident "
               "tokens they share that the prompt does not hold")
    paper = "https://arxiv.org/abs/2509.26598"
    Config = LookaheadConfig

    def decoding(self, model, tokenizer, cfg, ctx):
        return LookaheadSuppression(tokenizer, cfg)
