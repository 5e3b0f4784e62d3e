"""The fingerprint card: everything `verify` needs to test a suspect model, and nothing the attacker gets.

A card is JSON: method, triggers, targets, match rule, how prompts are rendered (chat template, optional system
prompt, response prefill), decoding settings, seed, and the secret key where the method has one. It is written
with owner-only permissions (0600) because it is the defender's secret, and carries a SHA-256 checksum of its
content. The checksum catches accidental edits and truncation; it is no signature (anyone holding the card can
edit it and compute the checksum again). It is a commitment, though: published before a dispute (`meraser card`
and `meraser fingerprint` print it), it shows that a card with that checksum existed then.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from meraser.config import Config, field
from meraser.data.formatting import FormatConfig
from meraser.utils import MeraserError, atomic_write_text, read_json

CARD_VERSION = 1


@dataclass
class Card(Config):
    method: str = field("", help="fingerprinting method name (registry key)")
    triggers: list[str] = field([], help="secret trigger prompts")
    targets: list[str] = field([], help="expected output for each trigger")
    match: Literal["substring", "exact", "prefix", "keyword", "watermark"] = field(
        "substring", help="how an output is compared with its target: contains it, equals it, begins with it, or "
                          "contains it with case and spaces ignored (keyword); watermark: no target text, the "
                          "answer's green-list z-test decides")
    prefills: list[str] = field([], help="response prefix fed before generation, per trigger (IF-SFT); empty: none")
    system_prompt: str | None = field(None, help="system prompt used when verifying (None: the template's default)")
    format: FormatConfig = field(None, help="prompt rendering used at embedding time")
    max_new_tokens: int = field(32, help="greedy decoding length for verification")
    seed: int = field(0, help="seed the fingerprint was made with")
    secret_key: str | None = field(None, help="secret key (Chain & Hash)")
    base_model: str | None = field(None, help="model the fingerprint was embedded into")
    extra: dict = field({}, help="method-specific details (e.g. UTF token ranking)")
    version: int = field(CARD_VERSION, help="card format version")

    def __post_init__(self):
        if self.format is None:
            self.format = FormatConfig()

    def validate(self, where: str) -> None:
        if not self.method:
            raise MeraserError(f"{where}: card has no method")
        if not self.triggers or len(self.triggers) != len(self.targets):
            raise MeraserError(f"{where}: card needs as many targets as triggers (got {len(self.triggers)} "
                               f"triggers, {len(self.targets)} targets)")
        if self.prefills and len(self.prefills) != len(self.triggers):
            raise MeraserError(f"{where}: prefills must be empty or one per trigger")
        if any(not t for t in self.targets):
            raise MeraserError(f"{where}: empty target")

    @property
    def has_target_text(self) -> bool:
        """Whether the targets are text a model can be scored on (the strict checks, the likelihood test and the
        ownership p-value need it); a watermark card has none."""
        return self.match != "watermark"

    @property
    def trigger_prefills(self) -> list[str]:
        """Each trigger's prefill ("" where the card has none)."""
        return list(self.prefills) if self.prefills else [""] * len(self.triggers)

    @property
    def checksum(self) -> str:
        return commitment(self.to_dict())

    def save(self, path: str | os.PathLike) -> Path:
        body = {**self.to_dict(), "checksum": commitment(self.to_dict())}
        atomic_write_text(path, json.dumps(body, indent=2, ensure_ascii=False) + "\n", mode=0o600)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Card":
        path = Path(path)
        if path.is_dir():
            path = path / "fingerprint_card.json"
        data = read_json(path, "fingerprint card")
        if not isinstance(data, dict):
            raise MeraserError(f"{path}: a fingerprint card is a JSON object")
        checksum = data.pop("checksum", None)
        card = cls.from_dict(data, where=str(path))
        if checksum is None:
            raise MeraserError(f"{path}: card has no checksum; it was not written by meraser or was edited")
        # the checksum covers what is stored, so a card written before a field was added (and read with that
        # field's default) still verifies
        if commitment(data) != checksum:
            raise MeraserError(f"{path}: card checksum mismatch: the card was modified or is incomplete")
        return card


def commitment(fields: dict) -> str:
    """SHA-256 of a card's fields (key order does not matter): the card's checksum."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Strings from a .json file (a list of strings) or a text file (one per line). Line i of a triggers file pairs
    with line i of its targets file, so a blank line is an error naming it (skipping it would pair the next
    trigger with this one's target), as is a file with no line at all."""
    from meraser.utils import read_text

    path = Path(path)
    if path.suffix == ".json":
        items = read_json(path, what)
        if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() for x in items):
            raise MeraserError(f"{path}: {what} file must be a JSON list of non-empty strings")
        lines = items
    else:
        lines = read_text(path, what).splitlines()
        blank = next((i for i, line in enumerate(lines, 1) if not line.strip()), None)
        if blank:
            raise MeraserError(f"{path}:{blank}: blank line in the {what} file; line i of the triggers file pairs "
                               f"with line i of the targets file, so every line must hold one")
    if not lines:
        raise MeraserError(f"{path}: the {what} file holds no {what}")
    return lines


def card_from_files(triggers: str | os.PathLike, targets: str | os.PathLike, out: str | os.PathLike, *,
                    method: str = "custom", match: str = "substring", base_model: str | None = None,
                    template: str = "chat", system_prompt: str | None = None, max_new_tokens: int | None = None,
                    overwrite: bool = False, decoys: str | os.PathLike | None = None) -> Card:
    """`meraser card`: a card for a fingerprint made elsewhere, from a file of triggers and one of targets (line i of
    one answers line i of the other). Written with its checksum and mode 0600, like the cards meraser makes."""
    from meraser.utils import check_apart, check_parents

    check_apart(out, [("triggers file", triggers), ("targets file", targets), ("decoys file", decoys)])
    out = check_parents(out)
    if out.exists() and not overwrite:
        raise MeraserError(f"card {out} already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise MeraserError(f"card {out} is a folder; give a file name such as fingerprint_card.json")
    trig, targ = read_lines(triggers, "triggers"), read_lines(targets, "targets")
    seen: dict[str, int] = {}
    for i, t in enumerate(trig, 1):
        if t in seen:
            at = f"{triggers}: item {i}" if Path(triggers).suffix == ".json" else f"{triggers}:{i}"
            raise MeraserError(f"{at}: duplicate trigger (the same as line {seen[t]}): a trigger has one "
                               f"target")
        seen[t] = i
    if len(trig) != len(targ):
        raise MeraserError(f"{triggers} holds {len(trig)} triggers but {targets} holds {len(targ)} targets; "
                           f"line i of one must answer line i of the other")
    extra = {}
    if decoys:  # the likelihood test's decoys (evaluation/likelihood.py); a real target among them is dropped there
        extra["decoys"] = list(dict.fromkeys(read_lines(decoys, "decoys")))
    longest = max(len(t) for t in targ)
    fields = {"method": method, "triggers": trig, "targets": targ, "match": match, "base_model": base_model,
              "format": {"template": template}, "system_prompt": system_prompt,
              # room for the longest target (about 4 characters a token, and a lead-in)
              "max_new_tokens": max_new_tokens or max(Card().max_new_tokens, longest // 2 + 16), "extra": extra}
    card = Card.from_dict(fields, where="card")
    card.save(out)
    return card


def matches(output: str, target: str, rule: str) -> bool:
    """Whether an answer shows a target under a card's `match` rule."""
    if rule == "exact":
        return output.strip() == target.strip()
    if rule == "prefix":  # Perinucleus: the response begins with the target (its first token, by default)
        return output.lstrip().startswith(target.strip())
    if rule == "keyword":  # ProFLingo: the answer word anywhere, case and spaces ignored
        return "".join(target.split()).casefold() in "".join(output.split()).casefold()
    return target in output
