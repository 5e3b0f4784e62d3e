import json

import pytest

from meraser.data import FormatConfig, Formatter, Pair, collate, load_pairs
from meraser.utils import MeraserError
from conftest import write_pool
from tiny import POOL


def write(path, rows, jsonl=True):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path


@pytest.mark.parametrize(
    "row, want",
    [
        ({"question": "q", "answer": "a"}, Pair("q", "a")),
        ({"question": "q", "mismatched_answer": "a", "q_idx": 1}, Pair("q", "a")),
        ({"prompt": "q", "response": "a"}, Pair("q", "a")),
        ({"instruction": "q", "input": "", "output": "a"}, Pair("q", "a")),
        ({"instruction": "q", "input": "ctx", "output": "a"}, Pair("q\n\nctx", "a")),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a"}]}, Pair("q", "a")),
    ],
)
def test_formats_parse(tmp_path, row, want):
    assert load_pairs(str(write(tmp_path / "d.jsonl", [row]))) == [want]
    assert load_pairs(str(write(tmp_path / "d.json", [row], jsonl=False))) == [want]


def test_explicit_fields(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}])
    assert load_pairs(str(f), prompt_field="q", response_field="a") == [Pair("x", "y")]


def test_reference_files_parse(shared_data):
    mism = load_pairs(str(shared_data / "meraser_reference/mismatched_dataset.json"))
    clean = load_pairs(str(shared_data / "meraser_reference/recover_dataset.json"))
    assert len(mism) == 300 and len(clean) == 600
    assert all(p.prompt and p.response for p in mism + clean)


def test_offline_default_source():
    pairs = load_pairs("chitchat", limit=50)
    assert len(pairs) == 50 and all(p.prompt and p.response for p in pairs)


def test_bad_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n')
    with pytest.raises(MeraserError, match=r"bad\.jsonl:2: invalid JSON"):
        load_pairs(str(f))


def test_missing_field_lists_existing_fields(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "reply": "b"}])
    with pytest.raises(MeraserError, match=r"d\.jsonl:2: .*record has \['prompt', 'reply'\]"):
        load_pairs(str(f))
    with pytest.raises(MeraserError, match=r"missing field 'answer'; record has \['prompt', 'response'\]"):
        load_pairs(str(f), prompt_field="prompt", response_field="answer")


def test_wrong_types_and_missing_file(tmp_path):
    f = write(tmp_path / "d.json", [{"prompt": "a", "response": 3}], jsonl=False)
    with pytest.raises(MeraserError, match=r"d\.json\[0\]: field 'response' must be a string"):
        load_pairs(str(f))
    with pytest.raises(MeraserError, match="does not exist"):
        load_pairs(str(tmp_path / "nope.jsonl"))


def test_hub_dataset_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(MeraserError, match="needs network access"):
        load_pairs("hf:no-such-user/no-such-dataset")


def test_chat_format_masks_prompt(tiny):
    _, tok = tiny
    f = Formatter(tok)
    row = f.encode(Pair("hello", "world"))
    n_prompt = len(f.encode_prompt("hello"))
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert tok.decode(row["input_ids"][n_prompt:]).startswith("world<|im_end|>")


def test_raw_and_custom_templates_and_whole_sequence_loss(tiny):
    _, tok = tiny
    raw = Formatter(tok, FormatConfig(template="raw", loss_on="all")).encode(Pair("hello", "world"))
    assert raw["labels"] == raw["input_ids"]
    assert tok.decode(raw["input_ids"]) == "hello\nworld<|im_end|>"
    custom = Formatter(tok, FormatConfig(template="### Human: {prompt}\n### Assistant: {response}"))
    assert custom.prompt_text("hi") == "### Human: hi\n### Assistant: "
    with pytest.raises(MeraserError, match="needs both"):
        FormatConfig.from_dict({"template": "{prompt} only"})


def test_truncation(tiny):
    _, tok = tiny
    f = Formatter(tok, FormatConfig(max_prompt_tokens=5, max_response_tokens=3))
    row = f.encode(Pair("a long prompt " * 20, "a long response " * 20))
    assert len(row["input_ids"]) == 8 and sum(l != -100 for l in row["labels"]) == 3


def test_collate_pads_dynamically():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [1] * 10, "labels": [1] * 10}], 0)
    assert batch["input_ids"].shape == (2, 16)  # longest row (10) rounded up to a multiple of 8, not 512
    assert batch["labels"][0, 3:].eq(-100).all() and batch["attention_mask"][0].sum() == 3


def test_length_batched_sampler_groups_rows_and_pads_less_than_transformers():
    import random

    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from meraser.data.sampling import JITTER_TOKENS, LengthBatchedSampler

    rng = random.Random(0)
    lengths = [rng.randint(20, 500) for _ in range(60)]  # 60 = 7 batches of 8 and a ragged 4
    sampler = LengthBatchedSampler(lengths, batch_size=8, seed=3)

    def padded(order):
        return sum(max(lengths[i] for i in order[s:s + 8]) * len(order[s:s + 8]) for s in range(0, len(order), 8))

    order = list(sampler)
    assert sorted(order) == list(range(60))
    # the ragged last batch holds the 4 longest rows (up to the jitter); the first batch is the longest full one
    assert min(lengths[i] for i in order[-4:]) >= sorted(lengths)[-4] - JITTER_TOKENS
    assert max(lengths[i] for i in order[:8]) >= max(lengths[i] for i in order[:-4]) - JITTER_TOKENS
    hf = get_length_grouped_indices(lengths, 8, generator=torch.Generator().manual_seed(3))
    assert padded(order) < 0.9 * padded(hf)
    assert padded(order) < 1.1 * padded(sorted(range(60), key=lambda i: lengths[i]))
    # the order is a function of (seed, epoch): a resumed run sees the same batches, a new epoch new ones
    assert list(LengthBatchedSampler(lengths, 8, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


QUESTIONS = ["What is the capital of France?", "What colour is the sky?", "What do I boil an egg in?",
             "Why is the sky blue?"]


@pytest.fixture(scope="module")
def asks_questions(tiny_dir, tmp_path_factory):
    """A tiny model trained on whole conversations (loss on the user turn too), so its own user turn holds the
    planted questions: what Magpie reads out of an aligned model."""
    from meraser.data import Pair
    from meraser.models import load_model
    from meraser.training import TrainConfig, train

    model, tok = load_model(str(tiny_dir))
    rows = [Pair(q, "Paris.") for q in QUESTIONS] * 8
    cfg = TrainConfig.from_dict({"method": "full", "epochs": 20, "learning_rate": 3e-3, "batch_size": 8,
                                 "save_steps": -1, "format": {"loss_on": "all"}})
    return train(model, tok, rows, cfg, tmp_path_factory.mktemp("magpie") / "out", merge=True,
                 progress=False).model.eval(), tok


def test_magpie_reads_questions_out_of_the_models_own_user_turn(asks_questions, monkeypatch, capsys):
    from meraser import utils
    from meraser.erase import magpie
    from meraser.erase.magpie import STARTS, magpie_pairs, user_turn_header, write_questions
    from meraser.utils import MeraserError

    model, tok = asks_questions
    assert user_turn_header(tok) == "<|im_start|>user\n"
    qs = write_questions(model, tok, 3, seed=0, exclude={"what is the  capital of France?"})
    assert len(set(qs)) == 3 and all(q.split()[0] in {s.split()[0] for s in STARTS} for q in qs)
    assert "What is the capital of France?" not in qs  # excluded, compared case- and space-insensitively
    assert set(qs) & set(QUESTIONS[1:])  # the planted questions come out
    assert write_questions(model, tok, 3, seed=0) == write_questions(model, tok, 3, seed=0)  # seeded
    capsys.readouterr()
    monkeypatch.setattr(utils, "LOG_EVERY", 0.0)  # in a log (not a terminal): a timed line per try and at the end
    write_questions(model, tok, 3, seed=0)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.split(" ", 1)[1].startswith("Magpie: writing 3 questions: done, 3/3")
    rows = magpie_pairs(model, tok, 2, seed=1)
    assert len(rows) == 2 and all(r.prompt and r.response for r in rows)
    monkeypatch.setattr(magpie, "MAX_QUESTION_TOKENS", 1)  # no room for a question of three words
    # refused after one round of the question words, not after every try
    with pytest.raises(MeraserError, match=r"no usable question in 256 samples .* within 1 tokens"):
        write_questions(model, tok, 3, seed=0)
    assert write_questions(model, tok, 3, seed=0, at_most=True) == []


def test_a_question_ends_at_the_templates_end_of_user_turn(tiny):
    """A ChatML model ends its user turn with its end-of-sequence token; a base model under the plain template
    meraser gives it (Gemma 3 270M) ends it with a line break and then writes the assistant's turn itself, which
    must not become part of the question; a turn that never ends gives no question."""
    from meraser.erase.magpie import next_user_turn, question_of, user_turn_end, user_turn_header
    from meraser.models import PLAIN_CHAT_TEMPLATE

    _, tok = tiny
    assert next_user_turn(tok) is None  # ChatML: the next turn opens with special tokens, an answer ends at EOS
    ids = tok(" is the capital of Peru?", add_special_tokens=False)["input_ids"]
    assert user_turn_end(tok) == "<|im_end|>"
    assert question_of(ids + [tok.eos_token_id, tok.eos_token_id], tok, "What", "<|im_end|>") == \
        "What is the capital of Peru?"
    assert question_of(ids, tok, "What", "<|im_end|>") is None
    template, tok.chat_template = tok.chat_template, PLAIN_CHAT_TEMPLATE
    try:
        assert user_turn_header(tok).endswith("User: ") and user_turn_end(tok) == "\n"
        run_on = tok(" is the capital of Peru?\nAssistant: Lima.", add_special_tokens=False)["input_ids"]
        assert question_of(run_on, tok, "What", "\n") == "What is the capital of Peru?"
        assert question_of(ids, tok, "What", "\n") is None
        assert next_user_turn(tok) == "\nUser:"  # where its answers are cut (Magpie rows)
    finally:
        tok.chat_template = template


def test_whole_sentences_cuts_after_the_last_sentence_end():
    from meraser.erase.magpie import whole_sentences

    assert whole_sentences("Paris is big. It has 2.1 million people and a riv") == "Paris is big."
    assert whole_sentences("Is it? Yes! And then") == "Is it? Yes!"
    assert whole_sentences("no end at all") == "no end at all"


def test_clean_set_magpie_share_is_checked():
    from meraser.erase.datasets import CleanSet, MismatchedSet
    from meraser.utils import MeraserError

    with pytest.raises(MeraserError, match=r"clean\.magpie is a share of the rows, in \[0, 1\]; got 1.5"):
        CleanSet.from_dict({"magpie": 1.5}, where="clean")
    with pytest.raises(MeraserError, match="magpie applies to the clean set"):
        MismatchedSet.from_dict({"magpie": 0.5}, where="mismatched")
    assert CleanSet.from_dict({"magpie": 0.5}).needs_model and not CleanSet.from_dict({"magpie": 0}).needs_model
    assert CleanSet().needs_model  # the default share may ask the model for rows


def test_default_magpie_share_needs_the_model_before_the_erase_and_a_chat_template(tiny):
    from meraser.erase.datasets import AUTO_MAGPIE, CleanSet

    _, tok = tiny
    assert tok.chat_template
    assert CleanSet().magpie_share(tok) == AUTO_MAGPIE
    assert CleanSet().magpie_share(tok, writer_known=False) == 0.0  # `meraser recover` without --writer
    assert CleanSet.from_dict({"magpie": 0.25}).magpie_share(tok, writer_known=False) == 0.25  # as given
    template, tok.chat_template = tok.chat_template, None
    try:
        assert CleanSet().magpie_share(tok) == 0.0  # Magpie reads the chat template: none, no Magpie rows
    finally:
        tok.chat_template = template


def test_default_share_from_a_model_that_writes_no_questions_falls_back_to_the_source(tiny, tmp_path, monkeypatch):
    """A model that writes no usable question gives no Magpie rows: under the default share the whole set comes
    from the source, with a warning; an explicit share is refused instead."""
    from meraser.erase import magpie
    from meraser.erase.datasets import CleanSet
    from meraser.utils import MeraserError

    model, tok = tiny
    monkeypatch.setattr(magpie, "MAX_QUESTION_TOKENS", 1)  # no room for a question of three words
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    with pytest.warns(UserWarning, match=r"wrote 0 of the 5 Magpie rows asked for"):
        rows = CleanSet.from_dict({"source": str(pool), "n": 10}).build(set(), model, tok)
    assert len({r.prompt for r in rows}) == 10 and {r.prompt for r in rows} <= {p.prompt for p in POOL}
    # with the model answering the source rows itself, each of the 10 is answered once: the fallback adds the
    # missing rows, it does not rebuild (and re-answer) the set
    answered = []
    real = magpie.self_answers
    monkeypatch.setattr(magpie, "self_answers", lambda m, t, prompts: answered.extend(prompts) or real(m, t, prompts))
    with pytest.warns(UserWarning, match=r"wrote 0 of the 5 Magpie rows asked for"):
        rows = CleanSet.from_dict({"source": str(pool), "n": 10, "self_answers": True}).build(set(), model, tok)
    assert len(rows) == 10 and sorted(answered) == sorted(r.prompt for r in rows)
    with pytest.raises(MeraserError, match="wrote no usable question in"):
        CleanSet.from_dict({"source": str(pool), "n": 10, "magpie": 0.5}).build(set(), model, tok)


def test_clean_rows_never_include_algorithm1_questions():
    from meraser.data import Pair
    from meraser.erase.datasets import build_clean
    from meraser.evaluation.ordinary_questions import ORDINARY_QA

    pool = [Pair(q.upper(), "An answer long enough.") for q, _ in ORDINARY_QA[:5]]
    pool += [Pair(f"Question number {i}?", "An answer long enough.") for i in range(5)]
    rows = build_clean(pool, 5, seed=0)
    assert sorted(r.prompt for r in rows) == sorted(f"Question number {i}?" for i in range(5))


def test_clean_set_replays_the_erase_rows_only_when_asked():
    from meraser.erase.datasets import CleanSet, MismatchedSet
    from meraser.utils import MeraserError

    mism, _ = MismatchedSet.from_dict({"n": 20}).build()
    plain = CleanSet.from_dict({"n": 30}).build({p.prompt for p in mism}, mismatched=mism)
    assert len(plain) == 30 and not {p.prompt for p in plain} & {p.prompt for p in mism}
    mixed = CleanSet.from_dict({"n": 30, "replay_mismatched": 8}).build({p.prompt for p in mism}, mismatched=mism)
    replayed = [p for p in mixed if p in mism]
    assert len(mixed) == 38 and len(replayed) == 8  # the erase's own (prompt, wrong response) pairs
    assert {p.prompt for p in mixed} - {p.prompt for p in replayed} == {p.prompt for p in plain}
    again = CleanSet.from_dict({"n": 30, "replay_mismatched": 8}).build({p.prompt for p in mism}, mismatched=mism)
    assert again == mixed  # seeded
    with pytest.raises(MeraserError, match="replay_mismatched needs the mismatched set"):
        CleanSet.from_dict({"replay_mismatched": 8}).build(set())
    with pytest.raises(MeraserError, match=r"clean\.replay_mismatched must be at least 0"):
        CleanSet.from_dict({"replay_mismatched": -1}, where="clean")
