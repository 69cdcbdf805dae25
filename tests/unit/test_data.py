import json

import pandas as pd
import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from lora_sweep.config import ConfigError, DataConfig
from lora_sweep.data import (
    IGNORE_INDEX,
    MODEL_COLUMNS,
    PaddingCollator,
    load_examples,
    load_prepared,
    normalize_text,
    prepare_data,
    read_table,
    split_examples,
    tokenize_example,
    tokenize_splits,
)
from lora_sweep.templates import Example, render_alpaca, render_default
from lora_sweep.testing.tiny_model import build_byte_tokenizer

from conftest import ASSETS


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def test_default_template_has_the_three_sections():
    example = Example(system="Be brief.", instruction="Repeat the word.", input="abc", response="abc")
    assert render_default(example) == (
        "### System:\nBe brief.\n\n### Instruction:\nRepeat the word.\n\nabc\n\n### Response:\n"
    )


def test_default_template_leaves_out_an_empty_system():
    assert render_default(Example(instruction="Say hi.", response="hi")) == "### Instruction:\nSay hi.\n\n### Response:\n"


def test_alpaca_template_has_an_input_section():
    text = render_alpaca(Example(instruction="Repeat.", input="abc", response="abc"))
    assert "### Input:\nabc\n\n### Response:\n" in text


def test_labels_mask_the_prompt_and_keep_response_and_eos(tokenizer):
    example = Example(instruction="Repeat the word.", input="abc", response="abc")
    row = tokenize_example(example, render_default, tokenizer, max_length=256)
    prompt_ids = tokenizer(render_default(example))["input_ids"]
    response_ids = tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert row["input_ids"][0] == tokenizer.bos_token_id
    assert row["prompt_length"] == len(prompt_ids)


def test_too_long_examples_are_dropped_not_truncated(tokenizer):
    example = Example(instruction="Repeat the word.", input="abc", response="abc")
    assert tokenize_example(example, render_default, tokenizer, max_length=10) is None


def test_normalize_text():
    assert normalize_text("  a  \r\nb \r\n\n\n\nc ") == "a\nb\n\nc"
    assert normalize_text(None) == "" and normalize_text(float("nan")) == ""


def _examples(n):
    return [Example(instruction=f"Repeat {i}.", response=str(i)) for i in range(n)]


def test_split_is_deterministic_and_independent_of_row_order():
    examples = _examples(50)
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    first = split_examples(examples, fractions, seed=3)
    again = split_examples(list(reversed(examples)), fractions, seed=3)
    assert {k: set(v) for k, v in first.items()} == {k: set(v) for k, v in again.items()}
    other_seed = split_examples(examples, fractions, seed=4)
    assert set(first["test"]) != set(other_seed["test"])
    assert [len(first[s]) for s in ("train", "val", "test")] == [40, 5, 5]


def test_no_prompt_is_in_two_splits_even_with_different_responses():
    examples = _examples(40) + [Example(instruction=f"Repeat {i}.", response=f"other {i}") for i in range(40)]
    splits = split_examples(examples, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    prompts = {s: {e.instruction for e in splits[s]} for s in splits}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]


def test_duplicates_and_empty_rows_are_removed_before_splitting(tmp_path):
    rows = [{"instruction": "Say a.", "response": "a"}] * 3 + [{"instruction": "Say b. ", "response": " b"}]
    rows += [{"instruction": "", "response": "x"}]  # empty instruction: dropped
    rows += [{"instruction": f"Say {i}.", "response": str(i)} for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    splits, dropped = load_examples(DataConfig(files=[str(path)]), seed=0)
    everything = [e for s in splits.values() for e in s]
    assert dropped == 1
    assert len(everything) == len(set(everything)) == 22
    assert Example(instruction="Say b.", response="b") in everything


def test_csv_and_parquet_read_like_jsonl(tmp_path):
    frame = pd.read_json(ASSETS / "instructions.jsonl", lines=True)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    jsonl = load_examples(DataConfig(files=[str(ASSETS / "instructions.jsonl")]), seed=0)
    for name in ("d.csv", "d.parquet"):
        assert load_examples(DataConfig(files=[str(tmp_path / name)]), seed=0) == jsonl


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": oops}\n')
    with pytest.raises(ConfigError, match="line 2: not valid JSON"):
        read_table(path)


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(ConfigError, match=r"\['instruction', 'response'\] not in the file"):
        load_examples(DataConfig(files=[str(path)]), seed=0)


def test_prepare_saves_once_and_reuses_by_hash(tokenizer, tmp_path):
    data = DataConfig(files=[str(ASSETS / "instructions.jsonl")], max_length=160)
    first = prepare_data(data, tokenizer, seed=0, out_dir=tmp_path)
    second = prepare_data(data, tokenizer, seed=0, out_dir=tmp_path)
    assert first.path == second.path and first.data_hash == second.data_hash
    saved = load_prepared(first.path)
    assert {s: len(saved[s]) for s in ("train", "val", "test")} == first.counts
    assert sum(first.counts.values()) == 80 - 10  # the asset repeats its first 10 rows
    other_seed = prepare_data(data, tokenizer, seed=1, out_dir=tmp_path)
    assert other_seed.data_hash != first.data_hash


def test_every_row_too_long_is_an_error(tokenizer, tmp_path):
    data = DataConfig(files=[str(ASSETS / "instructions.jsonl")], max_length=8)
    with pytest.raises(ConfigError, match="longer than 8 tokens"):
        prepare_data(data, tokenizer, seed=0, out_dir=tmp_path)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_collator_gives_the_same_batches_as_transformers(tokenizer, tmp_path, side):
    data = DataConfig(files=[str(ASSETS / "instructions.jsonl")], max_length=160)
    rows = load_prepared(prepare_data(data, tokenizer, seed=0, out_dir=tmp_path).path)["train"].select_columns(MODEL_COLUMNS)
    tokenizer.padding_side = side
    try:
        reference = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        ours = PaddingCollator.for_tokenizer(tokenizer)
        lengths = set()
        for start in range(0, len(rows), 7):
            features = [rows[i] for i in range(start, min(start + 7, len(rows)))]
            expected, got = reference(features), ours(features)
            assert set(got) == set(expected)
            for name in expected:
                assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
            lengths.update(len(f["input_ids"]) for f in features)
        assert len(lengths) > 1  # the batches really needed padding
    finally:
        tokenizer.padding_side = "right"


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat_template_is_the_tokenizers_own_with_a_single_bos():
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    data = DataConfig(files=[str(ASSETS / "instructions.jsonl")], template="chat", default_system="Be brief.",
                      max_length=400)
    rows = tokenize_splits(data, tokenizer, seed=0).records["train"]
    assert any(row["prompt"].startswith("<s><system>Be brief.\n<user>") for row in rows)  # rows with no system
    for row in rows:
        prompt_ids = row["input_ids"][: row["prompt_length"]]
        assert row["prompt"].startswith("<s><system>") and row["prompt"].endswith("\n<assistant>")
        assert prompt_ids == tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert prompt_ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, and no second one from the tokenizer


def test_chat_template_without_one_in_the_tokenizer_is_a_config_error():
    data = DataConfig(files=[str(ASSETS / "instructions.jsonl")], template="chat")
    with pytest.raises(ConfigError, match="'chat' uses the tokenizer's own chat template, but this model's tokenizer has none"):
        tokenize_splits(data, build_byte_tokenizer(), seed=0)
