"""Sources of (prompt, response) pairs.

A source is one of:
- a JSON or JSONL file: a list of records (or one record per line) with prompt/response fields. Field names are
  detected (question/answer, question/mismatched_answer as in the MEraser reference set, instruction/input/output,
  prompt/response, chat `messages`) or given explicitly;
- `chitchat`: the offline default, the Chit Chat Challenge corpus shipped by the PyPI package `chitchat-dataset`;
- `hf:ID` (or any name that is not a file): a Hugging Face dataset, which needs network access or a local cache.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from meraser.utils import MeraserError, iter_jsonl, read_json

OFFLINE_DEFAULT = "chitchat"
# (prompt field, response field) pairs tried in order when fields are not given
KNOWN_FIELDS = [
    ("question", "answer"),
    ("question", "mismatched_answer"),
    ("prompt", "response"),
    ("instruction", "output"),
    ("input", "output"),
    ("query", "response"),
    ("prompt", "completion"),
]


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "response": self.response}


def normalise(prompt: str) -> str:
    """The form prompts are compared in: lower case, single spaces."""
    return " ".join(prompt.lower().split())


def _record_to_pair(rec, where: str, prompt_field: str | None, response_field: str | None) -> Pair:
    if not isinstance(rec, dict):
        raise MeraserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if prompt_field or response_field:
        if not (prompt_field and response_field):
            raise MeraserError("give both prompt_field and response_field, or neither")
        fields = (prompt_field, response_field)
    elif "messages" in rec or "conversations" in rec:
        return _messages_to_pair(rec.get("messages", rec.get("conversations")), where)
    else:
        fields = next((f for f in KNOWN_FIELDS if f[0] in rec and f[1] in rec), None)
        if fields is None:
            known = ", ".join(f"{a}/{b}" for a, b in KNOWN_FIELDS)
            raise MeraserError(
                f"{where}: no prompt/response fields found; record has {sorted(rec)}; "
                f"expected one of {known}, or `messages` (or name them with prompt_field/response_field)"
            )
    for f in fields:
        if f not in rec:
            raise MeraserError(f"{where}: missing field '{f}'; record has {sorted(rec)}")
        if not isinstance(rec[f], str):
            raise MeraserError(f"{where}: field '{f}' must be a string, got {type(rec[f]).__name__}")
    prompt = rec[fields[0]]
    if fields == ("instruction", "output") and rec.get("input"):  # Alpaca: instruction plus optional input
        prompt = f"{prompt}\n\n{rec['input']}"
    return Pair(prompt, rec[fields[1]])


def _messages_to_pair(messages, where: str) -> Pair:
    if not isinstance(messages, list) or not messages:
        raise MeraserError(f"{where}: `messages` must be a non-empty list")
    roles = [(m.get("role") or m.get("from"), m.get("content", m.get("value"))) for m in messages if isinstance(m, dict)]
    user = next((c for r, c in roles if r in ("user", "human")), None)
    reply = next((c for r, c in roles if r in ("assistant", "gpt", "model")), None)
    if not isinstance(user, str) or not isinstance(reply, str):
        raise MeraserError(f"{where}: `messages` needs a user and an assistant turn with string content")
    return Pair(user, reply)  # the first exchange; MEraser data is single-turn


def _read_records(path: Path) -> list[tuple[str, object]]:
    """Return (location, record) for every record, locations being 'file:line' (JSONL) or 'file[i]' (JSON)."""
    if path.suffix == ".jsonl":
        return [(f"{path}:{i}", rec) for i, rec in iter_jsonl(path, "data file")]
    data = read_json(path, "data file")
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise MeraserError(f"{path}: expected a list of records (or an object holding one list)")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise MeraserError(f"{path}: expected a list of records")
    return [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]


def _chitchat() -> list[Pair]:
    import importlib.util

    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None:
        raise MeraserError("the offline default data needs the package chitchat-dataset: pip install chitchat-dataset")
    data = read_json(Path(spec.origin).with_name("dataset.json"), "chitchat dataset")
    pairs = []
    for conv in data.values():  # consecutive turns of a conversation become prompt -> response pairs
        turns = [" ".join(u["text"] for u in m).strip() for m in conv["messages"]]
        pairs.extend(Pair(a, b) for a, b in zip(turns, turns[1:]) if a and b)
    return pairs


def _hf(name: str, split: str, prompt_field: str | None, response_field: str | None) -> list[Pair]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, gated...
        raise MeraserError(
            f"cannot load Hugging Face dataset '{name}' ({type(e).__name__}: {str(e)[:200]}). It needs network "
            f"access or a local cache; offline, use a JSON/JSONL file or '{OFFLINE_DEFAULT}'"
        ) from None
    return [_record_to_pair(rec, f"{name}[{i}]", prompt_field, response_field) for i, rec in enumerate(ds)]


def check_source(source: str, where: str = "data") -> None:
    """Refuse a source that cannot be read, before any work: a missing file, a folder, a missing package.
    Hugging Face ids are only checked when loaded (that needs the network)."""
    import importlib.util

    path = Path(source)
    if source == OFFLINE_DEFAULT:
        if importlib.util.find_spec("chitchat_dataset") is None:
            raise MeraserError(f"{where}: '{OFFLINE_DEFAULT}' needs the package chitchat-dataset: "
                               f"pip install chitchat-dataset")
    elif path.is_dir():
        raise MeraserError(f"{where}: data source {path} is a folder; give a JSON/JSONL file, "
                           f"'{OFFLINE_DEFAULT}' or hf:DATASET_ID")
    elif path.suffix in (".json", ".jsonl") and not path.exists():
        raise MeraserError(f"{where}: data file {path} does not exist")


def load_pairs(
    source: str = OFFLINE_DEFAULT,
    *,
    prompt_field: str | None = None,
    response_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    shuffle_seed: int | None = None,
) -> list[Pair]:
    """Read (prompt, response) pairs from a file, `chitchat`, or a Hugging Face dataset id (`hf:ID` or `ID`)."""
    path = Path(source)
    if source == OFFLINE_DEFAULT:
        pairs = _chitchat()
    elif path.suffix in (".json", ".jsonl") or path.exists():
        check_source(source)
        pairs = [_record_to_pair(rec, where, prompt_field, response_field) for where, rec in _read_records(path)]
    else:
        pairs = _hf(source.removeprefix("hf:"), split, prompt_field, response_field)
    if not pairs:
        raise MeraserError(f"{source}: no records")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(pairs)
    return pairs[:limit] if limit else pairs


def write_pairs(pairs: list[Pair], path: str | Path, extra: list[dict] | None = None) -> None:
    """Write pairs as JSONL (prompt/response, plus optional per-row fields), atomically."""
    from meraser.utils import atomic_write_text

    rows = [{**p.to_dict(), **(extra[i] if extra else {})} for i, p in enumerate(pairs)]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
