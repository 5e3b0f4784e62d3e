"""The two MEraser datasets.

Mismatched (D_m, paper section 4.1): each prompt paired with the response of a *different* pair (a derangement: no
pair keeps its own response); with `by_type`, like the reference set, the response comes from a question of a
different type (what / why / how / other) whenever one is left. Clean (D_c): on-topic pairs, disjoint from the
mismatched prompts, after quality selection (dedupe, length bounds, no empty or degenerate responses). The clean
responses can also be the model's own answers (`self`), for users with prompts but no licensed answers.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from meraser.config import Config, field, key_path
from meraser.data.sources import OFFLINE_DEFAULT, Pair, normalise
from meraser.evaluation.ordinary_questions import ORDINARY_QA
from meraser.utils import MeraserError


@dataclass
class InstructionSet(Config):
    """What the mismatched and clean sets share: where the rows come from, how many, and the seed."""

    source: str = field(OFFLINE_DEFAULT, help="instruction source: JSON/JSONL file, 'chitchat' (offline) or hf:ID")
    n: int = field(1, help="rows to build")
    ready_made: bool = field(False, help="use the first n rows of `source` as they are (e.g. the paper's file)")
    seed: int = field(0, help="seed for drawing the rows")
    min_rows: ClassVar[int] = 1

    def validate(self, where: str) -> None:
        if self.n < self.min_rows:
            raise MeraserError(f"{key_path(where, 'n')} must be at least {self.min_rows}, got {self.n}")

    def check_inputs(self, where: str) -> None:
        from meraser.data.sources import check_source

        check_source(self.source, key_path(where, "source"))


@dataclass
class MismatchedSet(InstructionSet):
    """The mismatched set D_m: every default of `meraser erase` and of an experiment's `mismatched:` lives here."""

    n: int = field(300, help="rows to build (paper: 300)")
    by_type: bool = field(True, help="take each response from a question of another type (what/why/how/other)")
    min_rows: ClassVar[int] = 2  # a derangement needs two rows
    misplaced_keys = {k: f"{k} applies to the clean set (clean:), not to the mismatched one"
                      for k in ("self_answers", "magpie")}

    def build(self) -> tuple[list[Pair], list[dict] | None]:
        """(rows, per-row provenance or None for a ready-made set)."""
        from meraser.data import load_pairs

        if self.ready_made:
            return load_pairs(self.source)[: self.n], None
        return build_mismatched(load_pairs(self.source), self.n, self.seed, self.by_type)


# The Magpie share when none is given, where the model before the erase is known and has a chat template. Measured
# on SmolLM2-135M at the paper's sizes (README, "is the fingerprint erased"): half Magpie, half chitchat brought
# short answers back to 59-62% (base 57%; chitchat alone 3-13%) at 1.15-1.17x the base's perplexity (chitchat alone
# 1.13-1.15x, Magpie alone 1.34-1.41x), so Algorithm 1 ends "erased" offline for all three methods.
AUTO_MAGPIE = 0.5


@dataclass
class CleanSet(InstructionSet):
    """The clean set D_c: every default of `meraser recover` and of an experiment's `clean:` lives here."""

    n: int = field(600, help="rows to build (paper: 600)")
    self_answers: bool = field(False, help="replace the responses by the model's own greedy answers (data-free)")
    magpie: float | None = field(None, help=f"share of the rows the model before the erase writes and answers itself "
                                            f"from its chat template (Magpie-style, data-free); the rest come from "
                                            f"`source`. None: {AUTO_MAGPIE} where that model is known (an "
                                            f"experiment, `meraser recover --writer`) and has a chat template, else "
                                            f"0; 0: the paper's recovery, `source` rows only")
    replay_mismatched: int = field(0, help="mismatched rows (the run's own D_m) mixed into the clean ones, so "
                                           "recovery keeps the erased association broken; 0: the paper's recovery")
    misplaced_keys = {"by_type": "by_type applies to the mismatched set (mismatched:), not to the clean one"}

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.magpie is not None and not 0.0 <= self.magpie <= 1.0:
            raise MeraserError(f"{key_path(where, 'magpie')} is a share of the rows, in [0, 1]; got {self.magpie}")
        if self.replay_mismatched < 0:
            raise MeraserError(f"{key_path(where, 'replay_mismatched')} must be at least 0, got "
                               f"{self.replay_mismatched}")

    @property
    def needs_model(self) -> bool:
        return self.self_answers or self.magpie is None or self.magpie > 0

    def check_inputs(self, where: str) -> None:
        if self.magpie is None or self.magpie < 1.0:
            super().check_inputs(where)

    def magpie_share(self, tokenizer, writer_known: bool = True) -> float:
        """The share of Magpie rows: as given, or (None) AUTO_MAGPIE where the writer is the model before the erase
        and its tokenizer has a chat template (Magpie needs one), else 0."""
        if self.magpie is not None:
            return self.magpie
        return AUTO_MAGPIE if writer_known and getattr(tokenizer, "chat_template", None) else 0.0

    def build(self, exclude_prompts: set[str], model=None, tokenizer=None, mismatched: list[Pair] | None = None,
              writer_known: bool = True) -> list[Pair]:
        """Rows disjoint from `exclude_prompts` (the mismatched prompts) and from Algorithm 1's ordinary questions;
        answered by `model` with `self_answers`, partly written by it with `magpie`; with `replay_mismatched`, that
        many of the `mismatched` rows mixed in (drawn with the seed). `writer_known`: `model` is the model as it was
        before the erase (the default Magpie share applies only then)."""
        if self.replay_mismatched and not mismatched:
            raise MeraserError("clean.replay_mismatched needs the mismatched set: it replays the erase's own rows "
                               "(`meraser run`, the meraser attack, or `meraser recover` on a model that `meraser erase` wrote)")
        if self.replay_mismatched > len(mismatched or []):  # checked before the clean rows cost anything
            raise MeraserError(f"replay_mismatched {self.replay_mismatched}: the erase trained on only "
                               f"{len(mismatched)} mismatched rows; replay at most that many")
        rows = self._clean_rows(exclude_prompts, model, tokenizer, writer_known)
        if not self.replay_mismatched:
            return rows
        rng = random.Random(self.seed + 3)
        mixed = rows + rng.sample(mismatched, self.replay_mismatched)
        rng.shuffle(mixed)
        return mixed

    def _clean_rows(self, exclude_prompts: set[str], model, tokenizer, writer_known: bool) -> list[Pair]:
        from meraser.erase.magpie import magpie_pairs

        n_own = round(self.n * self.magpie_share(tokenizer, writer_known and model is not None))
        rows = self._source_rows(self.n - n_own, exclude_prompts, model, tokenizer)
        if not n_own:
            return rows
        held_out = set(exclude_prompts) | {p.prompt for p in rows} | {q for q, _ in ORDINARY_QA}
        own = magpie_pairs(model, tokenizer, n_own, self.seed, held_out, at_most=self.magpie is None)
        if len(own) < n_own:  # the default share, from a model that writes few usable questions: source rows instead
            import warnings

            warnings.warn(f"clean set: the model wrote {len(own)} of the {n_own} Magpie rows asked for (a share of "
                          f"{AUTO_MAGPIE}, the default); the other {self.n - len(own)} rows come from {self.source}",
                          stacklevel=2)
            # only the rows still missing, disjoint from those built: none is drawn (or self-answered) twice
            rows += self._source_rows(n_own - len(own), set(exclude_prompts) | {p.prompt for p in rows + own},
                                      model, tokenizer)
        mixed = rows + own
        random.Random(self.seed + 2).shuffle(mixed)
        return mixed

    def _source_rows(self, n: int, exclude_prompts: set[str], model, tokenizer) -> list[Pair]:
        """`n` rows from `source` (answered by `model` with `self_answers`)."""
        from meraser.data import load_pairs
        from meraser.erase.magpie import self_answers

        if not n:
            return []
        if self.ready_made:
            rows = load_pairs(self.source)[:n]
        else:
            rows = build_clean(load_pairs(self.source), n, self.seed, exclude_prompts)
        return self_answers(model, tokenizer, [p.prompt for p in rows]) if self.self_answers else rows


def question_type(prompt: str) -> str:
    first = prompt.strip().lower().split()[:3]
    for t in ("what", "why", "how"):
        if t in first or any(w.startswith(t) for w in first[:1]):
            return t
    return "other"


def good_pair(p: Pair, min_chars: int = 8, max_chars: int = 2000) -> bool:
    r = p.response.strip()
    if not (min_chars <= len(p.prompt.strip()) <= max_chars and min_chars <= len(r) <= max_chars):
        return False
    if r == p.prompt.strip() or re.search(r"(.)\1{15,}", r):  # echo, or a run of one character
        return False
    words = r.split()
    return len(words) < 8 or len(set(words)) / len(words) > 0.3  # not the same few words over and over


def dedupe(pairs: list[Pair]) -> list[Pair]:
    seen, out = set(), []
    for p in pairs:
        key = normalise(p.prompt)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def build_mismatched(pairs: list[Pair], n: int = 300, seed: int = 0, by_type: bool = True) -> tuple[list[Pair], list[dict]]:
    """n mismatched pairs and, per row, {q_type, answer_from_type, q_idx, a_idx} (indices into the pool used)."""
    pool = [p for p in dedupe(pairs) if good_pair(p)]
    if len(pool) < max(n, 2):
        raise MeraserError(f"need at least {max(n, 2)} usable pairs for the mismatched set, have {len(pool)}")
    rng = random.Random(seed)
    chosen = rng.sample(pool, n)
    types = [question_type(p.prompt) for p in chosen]
    # Group rows by type and rotate the grouped order by the size of the largest group: row k takes the response
    # of row k+shift. Any 0 < shift < n is a derangement; with shift = largest group every row gets another
    # type whenever no type holds more than half the rows (the reference set's construction).
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        groups.setdefault(t if by_type else "all", []).append(i)
    for g in groups.values():
        rng.shuffle(g)
    keys = sorted(groups)
    rng.shuffle(keys)
    order = [i for k in keys for i in groups[k]]
    shift = max(len(g) for g in groups.values()) if by_type else rng.randrange(1, n)
    shift = shift if 0 < shift < n else 1
    assignment = [0] * n
    for k, i in enumerate(order):
        assignment[i] = order[(k + shift) % n]
    rows = [Pair(chosen[i].prompt, chosen[assignment[i]].response) for i in range(n)]
    meta = [{"q_type": types[i], "answer_from_type": types[assignment[i]], "q_idx": i, "a_idx": assignment[i]}
            for i in range(n)]
    return rows, meta


def build_clean(pairs: list[Pair], n: int = 600, seed: int = 0, exclude_prompts: set[str] | None = None) -> list[Pair]:
    """n quality-selected pairs whose prompts are neither in `exclude_prompts` (the mismatched prompts) nor among
    Algorithm 1's ordinary questions (held out for verification)."""
    exclude = {normalise(p) for p in exclude_prompts or set()} | {normalise(q) for q, _ in ORDINARY_QA}
    pool = [p for p in dedupe(pairs) if good_pair(p) and normalise(p.prompt) not in exclude]
    if len(pool) < n:
        raise MeraserError(f"need {n} usable clean pairs disjoint from the mismatched prompts, have {len(pool)}")
    return random.Random(seed + 1).sample(pool, n)
