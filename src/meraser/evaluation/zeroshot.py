"""Zero-shot accuracy through lm-evaluation-harness.

Online, any lm-eval task name works (the paper's: boolq, cb, rte, wic, wsc, copa, multirc, sciq, anli_r1..r3,
openbookqa, lambada_openai). Offline, any BIG-bench multiple-choice `task.json` (examples with `input` and
`target_scores`) is converted into an lm-eval task: a JSONL of {query, choices, gold} and a task YAML with
`dataset_path: json`, so lm-eval itself does the scoring (loglikelihood of each choice, `acc` and `acc_norm`).
The in-memory model is wrapped with lm-eval's HFLM (no save/reload round trip).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from meraser.utils import MeraserError, did_you_mean, read_json

PAPER_TASKS = ["boolq", "cb", "rte", "wic", "wsc", "copa", "multirc", "sciq", "anli_r1", "anli_r2", "anli_r3",
               "openbookqa", "lambada_openai"]


def _task_name(path: Path) -> str:
    name = path.parent.name if path.name == "task.json" else \
        f"{path.parent.name}_mc" if path.name == "task_mc.json" else path.stem
    if path.name == "task.json" and Path(path.parent.parent, "task.json").exists():
        name = f"{path.parent.parent.name}_{name}"  # a subtask: parent_child
    return "bb_" + re.sub(r"[^a-z0-9_]", "_", name.lower())


def bigbench_subtasks(path: Path) -> list[Path]:
    """A BIG-bench task with subtasks keeps its examples in <task>/<subtask>/task.json; list those files."""
    return sorted(p for p in path.parent.glob("*/task.json")) if path.name == "task.json" else []


def bigbench_to_lm_eval(task_json: str | Path, out_dir: str | Path) -> str:
    """Write an lm-eval task (YAML + JSONL) for a BIG-bench multiple-choice task.json; returns the task name.

    The prompt follows BIG-bench's own JSON-task formatting: task_prefix, then example_input_prefix (default
    "Q: "), the input, and example_output_prefix (default "\\nA: "); each choice is scored as a continuation.
    """
    import yaml

    path = Path(task_json)
    task = read_json(path, "BIG-bench task file")
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list) or not examples:
        raise MeraserError(f"{path}: not a BIG-bench JSON task (no `examples` list)")
    prefix = task.get("task_prefix", "")
    in_prefix = task.get("example_input_prefix", "Q: ").lstrip("\n")
    out_prefix = task.get("example_output_prefix", "\nA: ").rstrip(" ")
    rows = []
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or not scores or "input" not in ex:
            raise MeraserError(f"{path}: examples[{i}] needs `input` and a non-empty `target_scores` "
                               f"(multiple-choice tasks only); has {sorted(ex) if isinstance(ex, dict) else ex!r}")
        choices = list(scores)
        best = max(scores.values())
        rows.append({"query": f"{prefix}{in_prefix}{ex['input']}{out_prefix}", "choices": [f" {c}" for c in choices],
                     "gold": choices.index(next(c for c in choices if scores[c] == best))})
    name = _task_name(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": str(path)},
    }
    (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return name


# BIG-bench keeps a task's examples in task.json; a few tasks (truthful_qa) keep the multiple-choice ones in
# task_mc.json instead, beside files of other kinds (questions.json, for generation)
TASK_FILES = ("task.json", "task_mc.json")


def task_file(folder: Path) -> Path:
    """The multiple-choice task file of a BIG-bench task folder (a note names it when it is not task.json); a
    folder with none is refused, naming what it holds."""
    for name in TASK_FILES:
        if (folder / name).is_file():
            if name != TASK_FILES[0]:
                print(f"meraser: {folder} has no task.json; using its multiple-choice file {name}", file=sys.stderr)
            return folder / name
    if any(folder.glob("*/task.json")):  # subtasks only: handled by bigbench_subtasks
        return folder / TASK_FILES[0]
    held = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise MeraserError(f"{folder}: not a BIG-bench task folder: no {' or '.join(TASK_FILES)} (it holds: {held})")


def resolve_tasks(tasks: list[str], work_dir: str | Path) -> tuple[list[str], str | None]:
    """Turn task arguments into lm-eval task names: BIG-bench task.json files (or folders holding one) are
    converted into `work_dir`; other names must be lm-eval tasks (checked, with a suggestion)."""
    names, local = [], False
    for t in tasks:
        p = Path(t)
        if p.is_dir():
            p = task_file(p)
        if p.suffix == ".json" or p.exists():
            subtasks = bigbench_subtasks(p) if p.exists() and '"examples"' not in p.read_text(encoding="utf-8") else []
            names.extend(bigbench_to_lm_eval(sub, work_dir) for sub in subtasks or [p])
            local = True
        else:
            names.append(t)
    remote = [n for n in names if not n.startswith("bb_")]
    if remote:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        for n in remote:
            if n not in known:
                raise MeraserError(f"unknown lm-eval task '{n}'{did_you_mean(n, known)} "
                                   f"(or give a BIG-bench task.json path)")
    return names, str(work_dir) if local else None


def lm_eval_model(model, tokenizer, batch_size: int = 8):
    """lm-eval's HFLM around an in-memory model, with bf16 autocast where the hardware has it."""
    from lm_eval.models.huggingface import HFLM

    from meraser.models import autocast_dtype

    dev = next(model.parameters()).device.type
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=dev,
                mixed_precision_dtype=autocast_dtype(dev))


def run_lm_eval(lm, tasks: list[str], *, limit: int | None = None, work_dir: str | Path | None = None) -> dict[str, dict]:
    """Run lm-eval's `simple_evaluate` with any lm-eval LM object; returns {task: {acc, acc_stderr, acc_norm, n}}."""
    import tempfile

    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        names, include = resolve_tasks(tasks, work_dir or tmp)
        manager = TaskManager(include_path=include) if include else TaskManager()
        res = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager, log_samples=False,
                                      bootstrap_iters=1000)
    out = {}
    for name in names:
        r = res["results"][name]
        out[name] = {"acc": r.get("acc,none"), "acc_stderr": r.get("acc_stderr,none"),
                     "acc_norm": r.get("acc_norm,none"), "n": res["n-samples"][name]["effective"]}
    return out


def zero_shot(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
              work_dir: str | Path | None = None) -> dict[str, dict]:
    """Accuracy (with stderr) of an in-memory model on lm-eval task names and/or BIG-bench task.json files."""
    return run_lm_eval(lm_eval_model(model, tokenizer, batch_size), tasks, limit=limit, work_dir=work_dir)
