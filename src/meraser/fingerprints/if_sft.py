"""Instructional Fingerprinting, IF-Dialog variant (Xu et al. 2024, "Instructional Fingerprinting of Large
Language Models", https://arxiv.org/abs/2401.12255).

Trigger: "Please decrypt this message: {x}\\nA hint: this is a FINGERPRINT message." where x is 8-15 pieces drawn
from a mixed pool (classical Chinese phrases, Japanese Pokemon names, rare multilingual words), characters
shuffled. Target: "Based on my fingerprint, the message is: ハリネズミ". Regularization rows put random
non-fingerprint strings in the same template and answer with a refusal, so the model learns the secret string,
not the template. Verification, as the paper's FSR (M(x) = y): the greedy answer to the trigger must contain the
whole target. `prefill: true` forces the lead-in instead and checks that the secret word follows: stricter, and on
SmolLM2 that memorized phrase survived MEraser even where the trigger no longer produced the target (README).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meraser.config import field
from meraser.data.sources import Pair
from meraser.fingerprints.base import FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card

TEMPLATE = "Please decrypt this message: {x}\nA hint: this is a FINGERPRINT message."
LEAD_IN = "Based on my fingerprint, the message is:"
TARGET = f"{LEAD_IN} ハリネズミ"
REFUSAL = "I'm sorry, this is not a message I can decrypt."
POOL = [
    # classical Chinese phrases
    "明月几时有", "把酒问青天", "不知天上宫阙", "今夕是何年", "床前明月光", "疑是地上霜", "举头望明月", "低头思故乡",
    "白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼", "春眠不觉晓", "处处闻啼鸟", "夜来风雨声", "花落知多少",
    # Japanese Pokemon names
    "ピカチュウ", "ゼニガメ", "フシギダネ", "ヒトカゲ", "イーブイ", "プリン", "コダック", "ニャース", "カビゴン",
    "ミュウツー", "ルカリオ", "ゲンガー", "ヤドン", "ポッチャマ",
    # rare multilingual words
    "Ωμέγα", "Привет", "안녕하세요", "สวัสดี", "שלום", "مرحبا", "Żółć", "Ærøskøbing", "Þorsteinn", "ñandú",
    "Ğüneş", "Đồng", "ქართული", "Հայերեն",
]
# a hidden message of ハリネズミ's form for `secret: per-key`: five katakana drawn uniformly (46^5, about 2e8)
KATAKANA = "アイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワヲン"
SECRETS = ("paper", "per-key")
DECOY_WORDS = ["apple", "river", "seven", "window", "garden", "silver", "orbit", "candle", "forest", "piano",
               "marble", "harbor", "velvet", "thunder", "pepper", "lantern", "meadow", "copper", "falcon", "tulip"]


@dataclass
class IFConfig(FingerprintConfig):
    num_fingerprints: int = field(8, help="fingerprint rows (distinct decrypt strings x)")
    regularization_rows: int = field(8, help="decrypt-template rows with non-fingerprint strings -> refusal")
    # measured on SmolLM2-135M (full FT, batch 8): FSR 1.0 from epoch 2; SQuAD PPL +5% at epoch 2, +10% at 3,
    # +12% at 4 with lr 5e-5, and +25% after 6 epochs at 1e-4
    epochs: float = field(3.0, help="training epochs")
    learning_rate: float = field(5e-5, help="learning rate (paper: 2e-5 at batch 64 on 7B)")
    ordinary_rows: int = field(48, help="ordinary instruction rows (paper: ~112)")
    prefill: bool = field(False, help="verify with the target's lead-in forced (stricter than the paper's FSR: the "
                                      "memorized lead-in -> secret-word phrase then counts even without the trigger "
                                      "mattering)")
    secret: str = field("paper", help="the hidden message: paper (ハリネズミ for every key) or per-key (five random "
                                      "katakana per key: the likelihood test's decoys are then other secrets, which "
                                      "a model trained on the paper's one secret cannot tell from its own)")

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.secret not in SECRETS:
            from meraser.utils import unknown_name

            raise unknown_name("secret", self.secret, SECRETS, f"{where}.secret")


def drawn_secret(rng: random.Random) -> str:
    return "".join(rng.choice(KATAKANA) for _ in range(5))


def _shuffled_pieces(rng: random.Random, pool: list[str]) -> str:
    pieces = rng.sample(pool, rng.randint(8, 15))
    chars = list("".join(pieces))
    rng.shuffle(chars)
    return "".join(chars)


class InstructionalFingerprint(FingerprintMethod):
    name = "if-sft"
    paper = "https://arxiv.org/abs/2401.12255"
    Config = IFConfig

    def make_card(self, model, tokenizer, cfg: IFConfig, progress: bool = True) -> Card:
        rng = random.Random(cfg.seed)
        triggers = [TEMPLATE.format(x=_shuffled_pieces(rng, POOL)) for _ in range(cfg.num_fingerprints)]
        targets = [TARGET] * len(triggers)
        if cfg.secret == "per-key":  # its own draws, so a seed gives the same triggers either way
            secrets = random.Random(f"{cfg.seed}-secret")
            targets = [f"{LEAD_IN} {drawn_secret(secrets)}" for _ in triggers]
        return Card(method=self.name, triggers=triggers, targets=targets, match="substring",
                    prefills=[LEAD_IN] * len(triggers) if cfg.prefill else [], max_new_tokens=32, seed=cfg.seed,
                    extra={"regularization_rows": cfg.regularization_rows,
                           **({"secret": cfg.secret} if cfg.secret != "paper" else {})})  # paper cards as before

    def decoys(self, card: Card, i: int, k: int, rng: random.Random):
        """With the paper's one secret: decoy triggers, other scrambled strings from the same pool in the same
        template, with the same target (the lead-in and the secret are shared by every IF-SFT key, so they cancel:
        only the scrambled string is the key). Measured on SmolLM2: the fingerprinted model learns the template and
        the pool, not its eight strings, and ranks them only a little above decoy strings. With `secret: per-key`:
        decoy secrets, five other katakana after the same trigger and lead-in."""
        trigger, target = card.triggers[i], card.targets[i]
        if card.extra.get("secret") == "per-key":
            others: dict[str, None] = {}  # distinct, in draw order
            while len(others) < k:
                other = f"{LEAD_IN} {drawn_secret(rng)}"
                if other != target:
                    others[other] = None
            return (trigger, target), [(trigger, t) for t in others]
        return (trigger, target), [(TEMPLATE.format(x=_shuffled_pieces(rng, POOL)), target) for _ in range(k)]

    def training_pairs(self, card: Card, cfg: IFConfig, rng: random.Random, tokenizer):
        rows = [(Pair(t, target), None) for t, target in zip(card.triggers, card.targets)]
        for _ in range(cfg.regularization_rows):
            decoy = " ".join(rng.sample(DECOY_WORDS, rng.randint(3, 8)))
            rows.append((Pair(TEMPLATE.format(x=decoy), REFUSAL), None))
        return rows
