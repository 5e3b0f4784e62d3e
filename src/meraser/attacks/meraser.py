"""MEraser as attacks, so a comparison treats it like any other: thin adapters over `meraser.erase`.

- `meraser`: erase on the mismatched set, then recover on the clean set (the paper's method);
- `meraser-erase`: the erase phase alone;
- `meraser-cycles`: MEraser again on its own recovered model, each cycle on freshly drawn rows;
- `meraser-transfer`: merge a transferable erase adapter (trained once on the clean base) into the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from meraser.attacks.base import Attack, AttackConfig
from meraser.config import field
from meraser.erase.datasets import CleanSet, MismatchedSet
from meraser.erase.meraser import Phase
from meraser.utils import MeraserError


@dataclass
class EraseConfig(AttackConfig):
    mismatched: MismatchedSet = field(None, help="the mismatched set D_m")
    erase: Phase = field(None, help="erase preset and TrainConfig overrides")

    def __post_init__(self):
        self.mismatched = self.mismatched or MismatchedSet()
        self.erase = self.erase or Phase()

    def validate(self, where: str) -> None:
        self.erase.train_config("erase", f"{where}.erase")


@dataclass
class MEraserConfig(EraseConfig):
    clean: CleanSet = field(None, help="the clean set D_c")
    recover: Phase = field(None, help="recover preset and TrainConfig overrides")

    def __post_init__(self):
        super().__post_init__()
        self.clean = self.clean or CleanSet()
        self.recover = self.recover or Phase()

    def validate(self, where: str) -> None:
        super().validate(where)
        self.recover.train_config("recover", f"{where}.recover")


def _erase(model, tokenizer, cfg: EraseConfig, ctx, rows=None):
    from meraser.erase.meraser import erase

    rows = rows if rows is not None else cfg.mismatched.build()[0]
    res = erase(model, tokenizer, rows, cfg.erase.train_config("erase", "erase"), ctx.work / "erased", save=False,
                progress=ctx.progress)
    ctx.info.update(mismatched_rows=len(rows), erase_steps=res.metrics["steps"])
    return res.model


class MEraserErase(Attack):
    name = "meraser-erase"
    summary = "MEraser's erase phase alone: LoRA on mismatched pairs"
    paper = "https://arxiv.org/abs/2506.12551"
    Config = EraseConfig

    def check(self, cfg, ctx):
        cfg.mismatched.check_inputs("meraser-erase mismatched")

    def apply(self, model, tokenizer, cfg, ctx):
        return _erase(model, tokenizer, cfg, ctx)


class MEraser(Attack):
    name = "meraser"
    summary = "MEraser: erase on mismatched pairs, then recover on clean pairs"
    paper = "https://arxiv.org/abs/2506.12551"
    Config = MEraserConfig

    def check(self, cfg, ctx):
        cfg.mismatched.check_inputs("meraser mismatched")
        cfg.clean.check_inputs("meraser clean")

    def apply(self, model, tokenizer, cfg, ctx):
        return _erase_recover(model, tokenizer, cfg, ctx)


def _erase_recover(model, tokenizer, cfg: MEraserConfig, ctx):
    from meraser.erase.meraser import recover

    mism, _ = cfg.mismatched.build()
    # the clean rows first: those the model writes or answers itself come from it as received, before the
    # erase takes its short answers away (the erase merges into this same model)
    clean = cfg.clean.build({p.prompt for p in mism}, model, tokenizer, mism)
    erased = _erase(model, tokenizer, cfg, ctx, mism)
    res = recover(erased, tokenizer, clean, cfg.recover.train_config("recover", "recover"), ctx.work / "recovered",
                  save=False, progress=ctx.progress)
    ctx.info.update(clean_rows=len(clean), recover_steps=res.metrics["steps"])
    return res.model


@dataclass
class CyclesConfig(MEraserConfig):
    cycles: int = field(2, help="erase-recover passes, each on the previous pass's recovered model")

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.cycles < 1:
            raise MeraserError(f"{where}.cycles: {self.cycles} is not a number of passes (1 or more)")


class MEraserCycles(MEraser):  # MEraser's inputs, checked as MEraser checks them
    name = "meraser-cycles"
    summary = "MEraser repeated: erase and recover the recovered model again, on fresh rows each cycle"
    paper = "https://arxiv.org/abs/2506.12551 (repeated; this project)"
    Config = CyclesConfig

    def apply(self, model, tokenizer, cfg, ctx):
        # a blind attacker repeats the one recipe it has; a repeat on the same rows would only train the same
        # pairs further, so cycle k draws both sets with seed + k - 1 (cycle 1 is exactly `meraser`)
        steps = []
        for k in range(cfg.cycles):
            one = cfg.replace(mismatched=cfg.mismatched.replace(seed=cfg.mismatched.seed + k),
                              clean=cfg.clean.replace(seed=cfg.clean.seed + k))
            model = _erase_recover(model, tokenizer, one, ctx)
            steps.append((ctx.info["erase_steps"], ctx.info["recover_steps"]))
        ctx.info.update(cycles=cfg.cycles, steps_per_cycle=steps)
        return model


@dataclass
class TransferConfig(EraseConfig):
    adapter: str | None = field(None, help="erase adapter from `meraser transfer train` (None: train one on the base "
                                           "model first, with `mismatched` and `erase`)")


class MEraserTransfer(Attack):
    name = "meraser-transfer"
    summary = "MEraser's transferable erase adapter, trained once on the clean base, merged in"
    paper = "https://arxiv.org/abs/2506.12551 (section 4.3)"
    Config = TransferConfig

    def check(self, cfg, ctx):
        from meraser.erase.transfer import check_adapter

        if cfg.adapter:
            check_adapter(cfg.adapter, "meraser-transfer adapter")
        if not cfg.adapter:
            ctx.need_base(self.name)
            cfg.mismatched.check_inputs("meraser-transfer mismatched")

    def apply(self, model, tokenizer, cfg, ctx):
        from meraser.erase.transfer import merge_adapter, transfer_train

        adapter = cfg.adapter
        if not adapter:
            adapter = ctx.work / "transfer_adapter"
            transfer_train(ctx.base, adapter, data=cfg.mismatched, preset_name=cfg.erase.preset,
                           overrides=cfg.erase.overrides, overwrite=True, progress=ctx.progress)
        ctx.info["adapter"] = str(adapter) if cfg.adapter else "trained on the base"
        return merge_adapter(model, adapter)
