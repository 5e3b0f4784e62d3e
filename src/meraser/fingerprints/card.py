"""The fingerprint card: everything `verify` needs to test a suspect model, and nothing the attacker gets.

A card is JSON: method, triggers, targets, match rule, how prompts are rendered (chat template, optional system
prompt, response prefill), decoding settings, seed, and the secret key where the method has one. It is written
with owner-only permissions (0600) because it is the defender's secret, and carries a SHA-256 checksum of its
content so a tampered or truncated card is refused.
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
    match: Literal["substring", "exact", "prefix"] = field("substring", help="how an output is compared with its "
                                                          "target: contains it, equals it, or begins with it")
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

    def _content(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    def save(self, path: str | os.PathLike) -> Path:
        body = {**self.to_dict(), "checksum": hashlib.sha256(self._content().encode()).hexdigest()}
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
        stored = json.dumps(data, sort_keys=True, ensure_ascii=False)
        if hashlib.sha256(stored.encode()).hexdigest() != checksum:
            raise MeraserError(f"{path}: card checksum mismatch: the card was modified or is incomplete")
        return card


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Strings from a .json file (a list of strings) or a text file (one per line, blank lines skipped)."""
    from meraser.utils import read_text

    path = Path(path)
    if path.suffix == ".json":
        items = read_json(path, what)
        if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
            raise MeraserError(f"{path}: {what} file must be a JSON list of non-empty strings")
        return items
    return [line for line in read_text(path, what).splitlines() if line.strip()]


def card_from_files(triggers: str | os.PathLike, targets: str | os.PathLike, out: str | os.PathLike, *,
                    method: str = "custom", match: str = "substring", base_model: str | None = None,
                    template: str = "chat", system_prompt: str | None = None, max_new_tokens: int | None = None,
                    overwrite: bool = False) -> Card:
    """`meraser card`: a card for a fingerprint made elsewhere, from a file of triggers and one of targets (line i of
    one answers line i of the other). Written with its checksum and mode 0600, like the cards meraser makes."""
    from meraser.utils import check_parents

    out = check_parents(out)
    if out.exists() and not overwrite:
        raise MeraserError(f"card {out} already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise MeraserError(f"card {out} is a folder; give a file name such as fingerprint_card.json")
    trig, targ = read_lines(triggers, "triggers"), read_lines(targets, "targets")
    if len(trig) != len(targ):
        raise MeraserError(f"{triggers} holds {len(trig)} triggers but {targets} holds {len(targ)} targets; "
                           f"line i of one must answer line i of the other")
    longest = max(len(t) for t in targ)
    fields = {"method": method, "triggers": trig, "targets": targ, "match": match, "base_model": base_model,
              "format": {"template": template}, "system_prompt": system_prompt,
              # room for the longest target (about 4 characters a token, and a lead-in)
              "max_new_tokens": max_new_tokens or max(Card().max_new_tokens, longest // 2 + 16)}
    card = Card.from_dict(fields, where="card")
    card.save(out)
    return card
