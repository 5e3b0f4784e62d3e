"""Incremental fine-tuning (paper section 5.3: Guanaco 300 rows, ShareGPT 6,000): keep training the stolen model on
clean instruction data and hope the fingerprint is overwritten. The one training routine, as it is."""

from __future__ import annotations

from dataclasses import dataclass

from meraser.attacks.base import Attack, AttackConfig
from meraser.config import field
from meraser.data.sources import OFFLINE_DEFAULT


@dataclass
class FineTuneConfig(AttackConfig):
    source: str = field(OFFLINE_DEFAULT, help="clean instruction data: JSON/JSONL file, 'chitchat' or hf:ID")
    n: int = field(300, help="rows (paper: 300 Guanaco rows; its larger run used 6,000 ShareGPT rows)")
    seed: int = field(0, help="seed for drawing the rows")
    train: dict = field({}, help="TrainConfig fields (method lora|full, epochs, learning_rate, lora, ...) over "
                                 "TrainConfig's defaults")

    def validate(self, where: str) -> None:
        from meraser.training import TrainConfig

        TrainConfig.from_dict(self.train, where=f"{where}.train")
        if self.n < 1:
            from meraser.utils import MeraserError

            raise MeraserError(f"{where}.n must be at least 1, got {self.n}")


class FineTune(Attack):
    name = "finetune"
    summary = "incremental fine-tuning (LoRA or full) on clean instruction data"
    paper = "MEraser section 5.3; Xu et al. 2024, Russinovich & Salem 2024"
    Config = FineTuneConfig

    def check(self, cfg, ctx):
        from meraser.data.sources import check_source

        check_source(cfg.source, "finetune source")

    def apply(self, model, tokenizer, cfg, ctx):
        from meraser.data import load_pairs
        from meraser.erase.datasets import build_clean
        from meraser.training import TrainConfig, train

        rows = build_clean(load_pairs(cfg.source), cfg.n, cfg.seed)
        tcfg = TrainConfig.from_dict(cfg.train, where="finetune.train")
        res = train(model, tokenizer, rows, tcfg, ctx.work / "finetune", merge=True, save=False, progress=ctx.progress)
        ctx.info.update(rows=len(rows), train_loss=res.metrics["train_loss"], steps=res.metrics["steps"])
        return res.model
