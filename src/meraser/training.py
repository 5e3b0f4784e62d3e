"""The one fine-tuning routine: LoRA or full fine-tuning on `transformers.Trainer`.

Every phase (fingerprint embedding, MEraser erase and recover, the transferable adapter, incremental
fine-tuning baselines) calls `train`. Because it is a plain Trainer, `torchrun --nproc_per_node N` or
`accelerate launch` run it on several processes unchanged.

Speed choices, measured on a 2-core CPU with SmolLM2-135M (see benchmarks/train_throughput.py): dynamic padding to
the longest row of a batch, batches grouped by length, bf16 autocast over fp32 weights where the CPU has native
bf16, no gradient checkpointing (it costs ~25-40% and memory is not the limit at this size), and on plain causal
LMs the LM head and loss computed in chunks on labelled positions only, with no attention mask on right-padded rows
(both exact; lm_loss.py says why they help).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from meraser.config import Config, field
from meraser.data.formatting import FormatConfig, Formatter, collate
from meraser.data.sources import Pair
from meraser.utils import (INTERRUPTION, MeraserError, changes, check_output_dir, flat_keys, read_json, set_seed,
                           settings_hash, write_json)

Probe = Callable[[Any, int], dict]  # (model, epoch) -> metrics, evaluation only


# LoRA target sets by name: peft matches these module names in Llama-style models (SmolLM2, Llama, Mistral, Qwen)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings(Config):
    r: int = field(16, help="LoRA rank")
    alpha: int = field(32, help="LoRA alpha (scaling = alpha / r)")
    dropout: float = field(0.0, help="dropout on the LoRA branch")
    target_modules: list[str] = field(["q_proj", "v_proj"], help="module names LoRA adapts (MEraser: q_proj, v_proj)")

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM", r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
        )


@dataclass
class TrainConfig(Config):
    method: Literal["lora", "full"] = field("lora", help="LoRA adapter or full fine-tuning")
    lora: LoraSettings = field(None, help="LoRA settings (method: lora)")
    epochs: float = field(3.0, help="training epochs (fractions allowed)")
    learning_rate: float = field(2e-4, help="peak learning rate")
    lr_scheduler: str = field("cosine", help="transformers scheduler name: constant, linear, cosine, ...")
    warmup_ratio: float = field(0.0, help="fraction of steps spent warming up")
    batch_size: int = field(8, help="rows per device per step")
    grad_accum: int = field(1, help="gradient accumulation steps")
    max_grad_norm: float = field(1.0, help="gradient clipping norm")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    max_steps: int = field(-1, help="stop after this many optimizer steps (-1: run all epochs)")
    seed: int = field(42, help="random seed")
    save_steps: int = field(0, help="checkpoint every N steps (0: at the end of every epoch, -1: never)")
    group_by_length: bool = field(True, help="batch rows of similar length together (less padding)")
    gradient_checkpointing: bool = field(False, help="trade compute for memory (slower)")
    precision: Literal["auto", "bf16", "fp32"] = field("auto", help="auto: bf16 autocast where the hardware has it")
    pad_to_length: int = field(0, help="pad every row to this length (reference-code behaviour; benchmarks only)")
    fused_loss: bool = field(True, help="LM head and cross-entropy in chunks, on labelled positions only (same loss, "
                                        "less time and memory; used where the architecture allows, see lm_loss.py)")
    mask_free: bool = field(True, help="no attention mask for right-padded rows: causal attention already keeps "
                                       "real tokens off the padding, and the kernel can then skip the masked half")
    logging_steps: int = field(10, help="log the loss every N steps")
    format: FormatConfig = field(None, help="how pairs become tokens: template, loss mask, truncation")

    def __post_init__(self):
        if self.lora is None:
            self.lora = LoraSettings()
        if self.format is None:
            self.format = FormatConfig()

    def validate(self, where: str) -> None:
        if self.epochs <= 0 and self.max_steps <= 0:
            raise MeraserError(f"{where}.epochs must be positive")
        if self.learning_rate <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise MeraserError(f"{where}: learning_rate, batch_size and grad_accum must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise MeraserError(f"{where}.warmup_ratio must be in [0, 1)")


@dataclass
class TrainResult:
    output_dir: Path
    model: Any  # the trained model in memory (a PeftModel for LoRA unless merged)
    metrics: dict
    probes: list[dict]


def _use_bf16(precision: str) -> bool:
    from meraser.models import autocast_dtype, device

    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    import torch

    return autocast_dtype(device()) == torch.bfloat16


def _trainer_class(fused_loss: bool, mask_free: bool, group_by_length: bool, seed: int):
    """transformers.Trainer with meraser's length-grouped batches (data/sampling.py) and its two exact shortcuts for
    plain causal LMs (lm_loss.py)."""
    from transformers import Trainer

    from meraser.data.sampling import LengthBatchedSampler
    from meraser.lm_loss import causal_lm_loss_sum, is_right_padded, logits_loss_sum, marked_excess_sum

    class MeraserTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            if not group_by_length:
                return super()._get_train_sampler(train_dataset)
            rows = train_dataset if train_dataset is not None else self.train_dataset
            return LengthBatchedSampler([len(r["input_ids"]) for r in rows], self.args.per_device_train_batch_size, seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # rows may mark tokens whose log-probability is pulled down to a reference (lm_loss.excess_logprob_sum)
            ref = inputs.get("ref_logprobs")
            inputs = {k: v for k, v in inputs.items() if k != "ref_logprobs"}
            if mask_free and is_right_padded(inputs.get("attention_mask")):
                inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
            if not fused_loss and ref is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if fused_loss:
                total, count = causal_lm_loss_sum(model, inputs["input_ids"], inputs.get("attention_mask"),
                                                  inputs["labels"], ref_logprobs=ref)
            else:  # the model's own forward and logits (a head the fused path cannot take)
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
                total, count = logits_loss_sum(logits, inputs["labels"])
                total = total + marked_excess_sum(logits, inputs["input_ids"], ref)
            # normalised as Trainer.compute_loss normalises the model's own loss (the Trainer then treats it as
            # scaled for gradient accumulation exactly when num_items_in_batch is given): the count spans the
            # accumulated batch and, when averaged across devices, all ranks, whose gradients DDP then averages
            if num_items_in_batch is None:
                return total / count.clamp(min=1)
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
            return loss

    return MeraserTrainer


def _last_checkpoint(work: Path) -> str | None:
    """The newest complete checkpoint. A run killed while writing one leaves a folder without trainer_state.json
    (the Trainer writes it last); such a folder is removed and the one before it is used."""
    if not work.is_dir():
        return None
    found = sorted((p for p in work.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        if _complete(ckpt):
            return str(ckpt)
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def _complete(ckpt: Path) -> bool:
    """Whether the Trainer finished writing `ckpt`: its state file (written last) exists and parses."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(ckpt.glob("*.safetensors"))


def work_dir(out: Path) -> Path:
    """Where checkpoints of a run writing `out` live until it finishes (beside `out`, never inside an input)."""
    return out.parent / f".{out.name}.work"


SETTINGS = "meraser_settings.json"  # in the work folder: what its checkpoints were trained with, for --resume


@contextlib.contextmanager
def _checkpoint_dir(out: Path, save: bool, resume: bool | str, overwrite: bool, identity: dict):
    """(work folder, checkpoint to resume from). A saved run keeps its checkpoints beside `out` when interrupted (for
    --resume), and removes the folder when it holds none; an unsaved run's temporary folder always goes. `identity`
    (the settings and rows) is recorded beside the checkpoints, and a resume with other settings is refused."""
    if not save:
        work = Path(tempfile.mkdtemp(prefix="meraser-train-"))
        try:
            yield work, None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    work = work_dir(out)
    last = _last_checkpoint(work)
    if last and not resume:
        if not overwrite:
            raise MeraserError(
                f"{work} holds checkpoints of an interrupted run; pass --resume to continue it or --overwrite to restart"
            )
        shutil.rmtree(work)
        last = None
    if last:
        _check_resume(work, identity, recorded_only=resume == "auto")
    elif resume is True:  # asked for by the user ("auto", the runner's: resume where there is something to)
        print(f"meraser: --resume: no checkpoint to continue from in {work}; starting from the beginning",
              file=sys.stderr)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / SETTINGS, identity)
    try:
        yield work, last
    except BaseException as e:
        left = _last_checkpoint(work)
        if left is None:  # nothing to resume from: leave no empty folder behind
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            INTERRUPTION["checkpoint"] = left
        raise


def _check_resume(work: Path, identity: dict, recorded_only: bool = False) -> None:
    """Refuse to continue checkpoints made with other settings or other rows, naming what changed: resuming them
    would train a mix of two runs (or, past the new total of steps, nothing) and label it as the new one.
    `recorded_only`: checkpoints with no record (an older meraser's) pass; the runner checks its stages itself."""
    record = work / SETTINGS
    made = read_json(record, "training settings") if record.is_file() else None
    if made != identity and not (made is None and recorded_only):
        raise MeraserError(f"--resume: the checkpoints in {work} were made with other settings ({changes(made, identity)})"
                           f"; resume with the settings they were made with, or start again with --overwrite "
                           f"(without --resume)")


def _identity(cfg: "TrainConfig", rows: list[dict]) -> dict:
    """What a resumed run must share with the checkpoints it continues: every training setting, and the rows (their
    number and a hash, which changes with --data, --n or the data's seed)."""
    return {**flat_keys(cfg.to_dict()), "rows": len(rows), "rows.sha256": settings_hash(rows)}


def check_target_modules(model, targets: list[str]) -> None:
    """Refuse LoRA target names that match no module (peft would ignore them, or fail with no hint), listing the
    model's linear module names."""
    import torch

    linear = (torch.nn.Linear,)
    with contextlib.suppress(ImportError):
        from transformers.pytorch_utils import Conv1D

        linear = (torch.nn.Linear, Conv1D)
    names = [n for n, m in model.named_modules() if isinstance(m, linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise MeraserError(f"LoRA target_modules {missing} match no module of this model; its linear modules are: "
                           f"{', '.join(leaves)}")


def _prepare(model, cfg: TrainConfig):
    """The model as it trains: wrapped in a fresh LoRA adapter (method: lora), checkpointing if asked, train mode."""
    if cfg.method == "lora":
        from peft import PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            raise MeraserError("model already carries an adapter; merge it first (load_model merges by default)")
        check_target_modules(model, cfg.lora.target_modules)
        spec = getattr(model, "_meraser_spec", None)
        model = get_peft_model(model, cfg.lora.to_peft())
        model._meraser_spec = spec
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.method == "lora":
            model.enable_input_require_grads()
    model.train()
    return model


def weight_averaging(share: float):
    """A TrainerCallback that moves the trained weights `share` of the way back to where training started, after
    every epoch (Perinucleus' "forgetting regulariser", Nasery et al. 2025: model averaging keeps utility)."""
    from transformers import TrainerCallback

    class WeightAveraging(TrainerCallback):
        start: dict = {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def on_epoch_end(self, args, state, control, model=None, **kw):
            import torch

            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in self.start:
                        p.mul_(1 - share).add_(self.start[n].to(p.device), alpha=share)

    return WeightAveraging()


def delta_scaling(factor: float):
    """A TrainerCallback that, when training ends, scales what training changed by `factor`: p <- p0 + factor (p -
    p0) (MergePrint: the weights trained are the pseudo-merged model's, B + alpha (O - B), so the owner's are
    B + (V - B) / alpha)."""
    from transformers import TrainerCallback

    class DeltaScaling(TrainerCallback):
        start: dict = {}

        def on_train_begin(self, args, state, control, model=None, **kw):
            trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            # under LoRA the change is B A with B starting at 0: scaling B alone scales the change exactly
            lora_b = [(n, p) for n, p in trained if "lora_B" in n]
            self.start = {n: p.detach().clone() for n, p in lora_b or trained}

        def on_train_end(self, args, state, control, model=None, **kw):
            import torch

            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in self.start:
                        start = self.start[n].to(p.device)
                        p.copy_(start + factor * (p - start))

    return DeltaScaling()


def _callbacks(probe: Probe | None, started: float, resumed_seconds: float) -> list:
    """The per-epoch probe, and the wall time so far written into every checkpoint (so a resumed run reports
    throughput over the whole run, not only over its last part)."""
    import torch
    from transformers import TrainerCallback

    class EpochProbe(TrainerCallback):
        # on the epoch's last step rather than on_epoch_end: a checkpoint saved at that step then already holds the
        # probe in its log history, so a resumed run has every epoch's probe exactly once
        def on_step_end(self, args, state, control, model=None, **kw):
            if probe is None or not state.is_world_process_zero or abs(state.epoch - round(state.epoch)) > 1e-4:
                return
            was_training = model.training
            model.eval()
            with torch.no_grad():
                res = {"epoch": round(state.epoch), **probe(model, round(state.epoch))}
            state.log_history.append({"probe": res, "step": state.global_step})
            model.train(was_training)

    class WallClock(TrainerCallback):
        # the Trainer saves a checkpoint after on_step_end / on_epoch_end, so what is appended here is inside it
        def _stamp(self, state, control):
            if control.should_save:
                state.log_history.append({"elapsed_s": resumed_seconds + time.perf_counter() - started,
                                          "step": state.global_step})

        def on_step_end(self, args, state, control, **kw):
            self._stamp(state, control)

        def on_epoch_end(self, args, state, control, **kw):
            self._stamp(state, control)

    return [EpochProbe(), WallClock()]


def _elapsed_before(checkpoint: str | None) -> float:
    """Wall time the run had spent when `checkpoint` was written (0 without one)."""
    if not checkpoint:
        return 0.0
    from meraser.utils import read_json

    history = read_json(Path(checkpoint) / "trainer_state.json", "trainer state").get("log_history", [])
    return next((h["elapsed_s"] for h in reversed(history) if "elapsed_s" in h), 0.0)


def _training_args(cfg: TrainConfig, work: Path, progress: bool):
    import torch
    from transformers import TrainingArguments

    use_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        bf16=_use_bf16(cfg.precision),
        use_cpu=not use_cuda,
        save_strategy={0: "epoch", -1: "no"}.get(cfg.save_steps, "steps"),
        save_steps=max(cfg.save_steps, 1),
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        report_to="none",
        train_sampling_strategy="random",  # or meraser's LengthBatchedSampler, see _trainer_class
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if not use_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def _metrics(trainer, result, rows: list[dict], cfg: TrainConfig, seconds: float, resumed_from: str | None) -> dict:
    """Loss, steps and throughput over the whole run, the parts before a resume included."""
    steps_per_epoch = math.ceil(len(rows) / (cfg.batch_size * cfg.grad_accum * trainer.args.world_size))
    done_epochs = trainer.state.global_step / max(steps_per_epoch, 1)
    real_tokens = sum(len(r["input_ids"]) for r in rows) * min(done_epochs, cfg.epochs if cfg.max_steps < 0 else done_epochs)
    history = trainer.state.log_history  # restored from the checkpoint on resume, so it spans the whole run
    losses = [h["loss"] for h in history if "loss" in h]
    # the Trainer's own training_loss averages only the steps this process ran over every step of the run
    train_loss = sum(losses) / len(losses) if resumed_from and losses else result.training_loss
    return {
        "train_loss": train_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "real_tokens_per_s": round(real_tokens / seconds, 1) if seconds > 0 else None,
        "bf16": trainer.args.bf16,
        "resumed_from": resumed_from,
        # from the trainer state, which checkpoints carry: a resumed run keeps the probes of its earlier epochs
        "probes": [h["probe"] for h in history if "probe" in h],
    }


def train(
    model,
    tokenizer,
    data: list[Pair] | list[dict],
    cfg: TrainConfig | None = None,
    out: str | os.PathLike = "runs/train",
    *,
    overwrite: bool = False,
    resume: bool | str = False,
    probe: Probe | None = None,
    merge: bool = False,
    progress: bool = True,
    callbacks: list | None = None,
    save: bool = True,
    extra_files: dict[str, str] | None = None,
) -> TrainResult:
    """Fine-tune `model` on `data` and save the adapter (LoRA) or model (full, or LoRA with `merge`) to `out`.

    `data` is a list of Pairs (formatted with `cfg.format`) or of already tokenized {input_ids, labels} rows.
    `probe(model, epoch)` runs after every epoch for monitoring only (e.g. FSR); its results are kept in
    `metrics` and in `out/train_log.json`. With `resume`, training continues from the last checkpoint of an
    interrupted run that wrote the same `out` with the same settings and rows (a note says so when there is none;
    "auto" resumes without the note, for runs that always ask). `extra_files` ({name: text}) are saved beside the weights.
    """
    import torch

    cfg = cfg or TrainConfig()
    out = Path(out)
    if save:
        check_output_dir(out, overwrite)
    rows = Formatter(tokenizer, cfg.format).encode_all(data) if data and isinstance(data[0], Pair) else list(data)
    if not rows:
        raise MeraserError("no training rows")
    with _checkpoint_dir(out, save, resume, overwrite, _identity(cfg, rows)) as (work, last):
        set_seed(cfg.seed)
        before = _elapsed_before(last)
        t0 = time.perf_counter()
        trainer = _trainer(_prepare(model, cfg), tokenizer, rows, cfg, work, progress,
                           [*_callbacks(probe, t0, before), *(callbacks or [])])
        result = trainer.train(resume_from_checkpoint=last)
        metrics = _metrics(trainer, result, rows, cfg, before + time.perf_counter() - t0, last)
        trained = _merged(trainer.model) if merge and cfg.method == "lora" else trainer.model
        trained.eval()
        if trainer.is_world_process_zero():
            if save:
                from meraser.models import save_model

                log = json.dumps({"config": cfg.to_dict(), "metrics": metrics}, indent=2, default=str)
                save_model(trained, tokenizer, out, overwrite=overwrite,
                           extra_files={"train_log.json": log, **(extra_files or {})})
            shutil.rmtree(work, ignore_errors=True)
        if trainer.args.world_size > 1:
            torch.distributed.barrier()
    return TrainResult(out, trained, metrics, metrics["probes"])


def _trainer(model, tokenizer, rows: list[dict], cfg: TrainConfig, work: Path, progress: bool, callbacks: list):
    """The Trainer for `rows`: dynamic padding, length-grouped batches, the fused loss where the model allows."""
    from meraser.lm_loss import is_plain_causal_lm
    from meraser.models import pad_id

    pad = pad_id(tokenizer)
    plain = is_plain_causal_lm(model)
    trainer = _trainer_class(cfg.fused_loss and plain, cfg.mask_free and plain,
                             cfg.group_by_length and not cfg.pad_to_length, cfg.seed)(
        model=model,
        args=_training_args(cfg, work, progress),
        train_dataset=rows,
        data_collator=lambda feats: collate(feats, pad, fixed_length=cfg.pad_to_length or None),
        callbacks=callbacks,
    )
    if not progress:  # without progress bars the Trainer prints every log dict to stdout instead
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _merged(peft_model):
    """The LoRA merged into the weights, keeping the spec the model was loaded from (for save records)."""
    spec = getattr(peft_model, "_meraser_spec", None)
    merged = peft_model.merge_and_unload()
    merged._meraser_spec = spec
    return merged


def train_from_source(
    model: str,
    data: str,
    cfg: TrainConfig,
    out: str | os.PathLike,
    *,
    prompt_field: str | None = None,
    response_field: str | None = None,
    limit: int | None = None,
    trust_remote_code: bool = False,
    **kw,
) -> TrainResult:
    """`meraser train`: load a model spec and an instruction source, then `train`."""
    from meraser.data import load_pairs
    from meraser.models import input_folders, load_model

    check_output_dir(Path(out), kw.get("overwrite", False), input_folders(model, "model") + [("--data file", data)])
    pairs = load_pairs(data, prompt_field=prompt_field, response_field=response_field, limit=limit)
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    return train(m, tok, pairs, cfg, out, **kw)
