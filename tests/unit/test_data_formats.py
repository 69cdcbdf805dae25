"""Data formats (`data.format`): conversations (messages, sharegpt), prompt/completion, plain text, and `auto`;
the loss masked to assistant turns, checked token by token, with a chat template and with the default template."""

import json

import pytest

from lora_sweep.config import ConfigError, DataConfig
from lora_sweep.data import IGNORE_INDEX, load_samples, tokenize_segments, tokenize_splits
from lora_sweep.templates import (Conversation, Example, Message, PlainText, as_format, prompt_for, render_default,
                                  segments_for)
from lora_sweep.testing.tiny_model import build_byte_tokenizer

# A chat template in the usual shape: BOS, then each turn as <role>content and an end-of-turn newline.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
TWO_TURNS = Conversation((Message("system", "Be brief."), Message("user", "Hi?"), Message("assistant", "Hello."),
                          Message("user", "Name?"), Message("assistant", "Ada.")))


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def labelled_runs(row) -> list[list[int]]:
    """The runs of token ids that carry labels: what the loss is computed on."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token  # a label is the token itself (the model shifts them)
            current.append(token)
    if current:
        runs.append(current)
    return runs


def labelled_text(row, tokenizer) -> list[str]:
    """The runs of tokens that carry labels, decoded (special tokens shown): what the loss is computed on."""
    runs = labelled_runs(row)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("train_on, trained", [("all_assistant", ["Hello.\n", "Ada.\n"]), ("last_assistant", ["Ada.\n"])])
def test_chat_template_masks_exactly_the_assistant_turns_and_their_end_of_turn(chat_tokenizer, train_on, trained):
    row = tokenize_segments(segments_for(TWO_TURNS, "chat", chat_tokenizer, train_on), chat_tokenizer, 512)
    whole = chat_tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in TWO_TURNS.messages],
                                               tokenize=False)
    assert whole == "<s><system>Be brief.\n<user>Hi?\n<assistant>Hello.\n<user>Name?\n<assistant>Ada.\n"
    # Token by token: the ids are the whole rendering's (a single BOS), and a token carries a label exactly
    # when its character lies in an assistant turn's content or the newline that ends it.
    assert row["input_ids"] == chat_tokenizer(whole, add_special_tokens=False)["input_ids"]
    spans = [(whole.index(text), whole.index(text) + len(text)) for text in trained]
    offsets = chat_tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for (start, end), label in zip(offsets, row["labels"], strict=True):
        inside = any(low <= start and end <= high for low, high in spans)
        assert (label != IGNORE_INDEX) == inside, (whole[start:end], label)
    assert labelled_text(row, chat_tokenizer) == trained
    # Generation is prompted with everything before the last assistant turn.
    assert chat_tokenizer.decode(row["input_ids"][: row["prompt_length"]]) == whole[: whole.rindex("Ada.")]


@pytest.mark.parametrize("train_on, trained", [("all_assistant", ["Hello.</s>", "Ada.</s>"]),
                                               ("last_assistant", ["Ada.</s>"])])
def test_default_template_turn_by_turn_masks_each_answer_and_its_eos(tokenizer, train_on, trained):
    row = tokenize_segments(segments_for(TWO_TURNS, "default", tokenizer, train_on), tokenizer, 512)
    text = tokenizer.decode(row["input_ids"])
    assert text == ("<s>### System:\nBe brief.\n\n### Instruction:\nHi?\n\n### Response:\nHello.</s>"
                    "\n\n### Instruction:\nName?\n\n### Response:\nAda.</s>")
    assert labelled_text(row, tokenizer) == trained
    labels = [token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert labels == sum((tokenizer(t.replace("</s>", ""), add_special_tokens=False)["input_ids"]
                          + [tokenizer.eos_token_id] for t in trained), [])
    assert tokenizer.decode(row["input_ids"][: row["prompt_length"]]).endswith("Name?\n\n### Response:\n")


def test_one_turn_conversation_is_the_instruction_formats_example_token_for_token(tokenizer):
    conversation = Conversation((Message("system", "S."), Message("user", "Q?"), Message("assistant", "A.")))
    example = Example(instruction="Q?", response="A.", system="S.")
    as_conversation = tokenize_segments(segments_for(conversation, "default", tokenizer), tokenizer, 256)
    as_instruction = tokenize_segments(segments_for(example, "default", tokenizer), tokenizer, 256)
    assert as_conversation == as_instruction
    assert tokenizer.decode(as_instruction["input_ids"][: as_instruction["prompt_length"]]) == "<s>" + render_default(example)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def rows_of(data_format: str, n: int = 30) -> list[dict]:
    rows = []
    for i in range(n):
        question, answer = f"What is {i} + 1?", f"{i + 1}"
        rows.append({
            "messages": {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                                      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]},
            "sharegpt": {"conversations": [{"from": "system", "value": "Count."}, {"from": "human", "value": question},
                                           {"from": "gpt", "value": answer}]},
            "prompt_completion": {"prompt": question + " ", "completion": answer},
            "text": {"text": f"{question} It is {answer}."},
            "instruction": {"instruction": question, "response": answer},
        }[data_format])
    return rows


@pytest.mark.parametrize("data_format", ["messages", "sharegpt", "prompt_completion", "text", "instruction"])
def test_auto_reads_each_format_from_its_columns_and_trains_on_its_answers(tmp_path, chat_tokenizer, data_format):
    data = DataConfig(files=[write_jsonl(tmp_path / "d.jsonl", rows_of(data_format))], max_length=256)
    loaded = load_samples(data, seed=0)
    assert loaded.format == data_format
    tokenized = tokenize_splits(data, chat_tokenizer, 0, loaded)
    expected_template = {"messages": "chat", "sharegpt": "chat", "instruction": "default"}.get(data_format, "none")
    assert (tokenized.format, tokenized.template) == (data_format, expected_template)
    assert sum(tokenized.counts.values()) == 30
    for row in tokenized.records["train"]:
        trained = labelled_text(row, chat_tokenizer)
        answer = row["response"]
        if data_format == "messages":
            assert trained == [f"{int(row['prompt'].split('What is ')[1].split(' ')[0]) + 1}\n", "Yes.\n"]
            assert answer == "Yes."
        elif data_format == "sharegpt":
            assert row["prompt"].startswith("<s><system>Count.\n<user>What is") and trained == [answer + "\n"]
        elif data_format == "text":
            assert row["prompt"] == "" and trained == ["<s>" + answer + "</s>"]  # every token, EOS included
            assert row["prompt_length"] == 1  # generation starts from BOS
        else:
            assert trained == [answer + "</s>"]


def test_a_format_set_by_name_needs_its_columns(tmp_path):
    data = DataConfig(files=[write_jsonl(tmp_path / "d.jsonl", rows_of("instruction"))], format="messages")
    with pytest.raises(ConfigError, match=r"`data.format`: messages needs column\(s\) \['messages'\]"):
        load_samples(data, seed=0)


def test_auto_refuses_files_of_two_formats(tmp_path):
    files = [write_jsonl(tmp_path / "a.jsonl", rows_of("messages")), write_jsonl(tmp_path / "b.jsonl", rows_of("text"))]
    with pytest.raises(ConfigError, match=r"auto reads .*b.jsonl as text but .*a.jsonl as messages"):
        load_samples(DataConfig(files=files), seed=0)


GOOD = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize("conversation, reason", [
    ([{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}], "turn 2 has an unknown role 'bot'"),
    ([{"role": "user", "content": "Q"}], "has no assistant turn"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}], "turn 2 (assistant) is empty"),
    ([{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}], "roles out of order"),
    ([{"role": "user", "content": "Q"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A"}],
     "roles out of order: turn 2 is user's where assistant's belongs"),
    ([*GOOD, {"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}],
     "a system turn after the first turn"),
    ([*GOOD, {"role": "user", "content": "Q2"}], "ends with a user turn"),
    ([{"role": "user"}, {"role": "assistant", "content": "A"}], "turn 1 must be a {role, content} object"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, GOOD[1]], "turn 1 (user) holds"),
    ("Q and A", "must be a non-empty list of turns"),
])
def test_bad_conversations_are_counted_and_the_first_is_named_with_its_line(tmp_path, conversation, reason):
    rows = [{"messages": GOOD}] * 3 + [{"messages": conversation}, {"messages": GOOD}, {"messages": conversation}]
    data = DataConfig(files=[write_jsonl(tmp_path / "d.jsonl", rows)])
    with pytest.raises(ConfigError) as error:
        load_samples(data, seed=0)
    message = str(error.value)
    assert "2 of 6 conversations in column 'messages' are not usable; the first, line 4: " in message
    assert reason in message


def test_openai_text_parts_are_joined_and_sharegpt_roles_are_checked(tmp_path):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": "Hi."}]
    data = DataConfig(files=[write_jsonl(tmp_path / "d.jsonl", [{"messages": parts}] * 4 + rows_of("messages"))])
    samples = [s for split in load_samples(data, seed=0).splits.values() for s in split]
    assert Conversation((Message("user", "Hello\nthere"), Message("assistant", "Hi."))) in samples
    bad = [{"from": "human", "value": "Q"}, {"from": "chatgpt", "value": "A"}]
    data = DataConfig(files=[write_jsonl(tmp_path / "s.jsonl", [{"conversations": bad}] + rows_of("sharegpt"))])
    with pytest.raises(ConfigError, match=r"line 1: turn 2 has an unknown `from` 'chatgpt' \(system, human or gpt\)"):
        load_samples(data, seed=0)
    for role in (["human"], {"name": "human"}):  # not text at all: the same error, not a crash on hashing it
        bad = [{"from": role, "value": "Q"}, {"from": "gpt", "value": "A"}]
        data = DataConfig(files=[write_jsonl(tmp_path / "s.jsonl", [{"conversations": bad}] + rows_of("sharegpt"))])
        with pytest.raises(ConfigError, match=r"line 1: turn 1 has an unknown `from`"):
            load_samples(data, seed=0)


def test_text_is_trained_on_every_token_whatever_train_on_says(tokenizer):
    """`last_assistant` picks among conversation turns; text has none, and keeps its loss on every token."""
    sample = PlainText(prompt="", completion="hello world")
    for train_on in ("all_assistant", "last_assistant"):
        row = tokenize_segments(segments_for(sample, "none", tokenizer, train_on), tokenizer, 64)
        assert row["labels"] == row["input_ids"]


def test_templates_that_do_not_fit_the_format_are_refused(tmp_path, tokenizer, chat_tokenizer):
    messages = write_jsonl(tmp_path / "m.jsonl", rows_of("messages"))
    text = write_jsonl(tmp_path / "t.jsonl", rows_of("text"))
    with pytest.raises(ConfigError, match="alpaca is for the instruction format"):
        tokenize_splits(DataConfig(files=[messages], template="alpaca"), chat_tokenizer, 0)
    with pytest.raises(ConfigError, match="the text format is used as written.*leave data.template unset"):
        tokenize_splits(DataConfig(files=[text], template="default"), chat_tokenizer, 0)
    with pytest.raises(ConfigError, match="'chat' uses the tokenizer's own chat template"):
        tokenize_splits(DataConfig(files=[messages], template="chat"), tokenizer, 0)
    # No chat template and none asked for: conversations use the default template turn by turn.
    assert tokenize_splits(DataConfig(files=[messages], max_length=300), tokenizer, 0).template == "default"


def test_a_chat_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    tokenizer = build_byte_tokenizer()
    # Shows only the last assistant turn's content: each new turn changes the text before it.
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{% if m['role'] != 'assistant' or loop.last %}"
                               "{{ m['content'] }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    data = DataConfig(files=[write_jsonl(tmp_path / "m.jsonl", rows_of("messages"))], max_length=300)
    with pytest.raises(ConfigError, match="does not render the conversation turn by turn.*data.template: default"):
        tokenize_splits(data, tokenizer, 0)


def test_hash_of_the_instruction_format_is_unchanged_and_other_formats_hash_their_masking(tmp_path, chat_tokenizer):
    instruction = DataConfig(files=[write_jsonl(tmp_path / "i.jsonl", rows_of("instruction"))])
    assert tokenize_splits(instruction, chat_tokenizer, 0).data_hash == \
        tokenize_splits(instruction.model_copy(update={"template": "default"}), chat_tokenizer, 0).data_hash
    messages = DataConfig(files=[write_jsonl(tmp_path / "m.jsonl", rows_of("messages"))])
    last = messages.model_copy(update={"train_on": "last_assistant"})
    assert tokenize_splits(messages, chat_tokenizer, 0).data_hash != tokenize_splits(last, chat_tokenizer, 0).data_hash


def test_generation_prompts_a_question_as_the_sweeps_format_was_trained(chat_tokenizer, tokenizer):
    question = Example(instruction="Name?", response="", system="Be brief.")
    assert prompt_for(as_format(question, "messages"), "chat", chat_tokenizer) == (
        "<s><system>Be brief.\n<user>Name?\n<assistant>", False)
    assert prompt_for(as_format(question, "messages"), "default", tokenizer) == (
        "### System:\nBe brief.\n\n### Instruction:\nName?\n\n### Response:\n", True)
    assert prompt_for(as_format(question, "prompt_completion"), "none", tokenizer) == ("Name?", True)
    assert prompt_for(question, "default", tokenizer) == (render_default(question), True)


def test_the_chat_example_reads_conversations_with_the_models_chat_template():
    from pathlib import Path

    from lora_sweep.config import load_config
    from lora_sweep.models import load_tokenizer

    config = load_config(Path(__file__).resolve().parents[2] / "examples" / "chat.yaml")
    tokenizer = load_tokenizer(config)
    tokenized = tokenize_splits(config.data, tokenizer, config.seed)
    assert (tokenized.format, tokenized.template) == ("messages", "chat")
    assert tokenized.counts == {"train": 480, "val": 60, "test": 60} and not any(tokenized.dropped.values())
    for row in tokenized.records["val"]:
        turns = labelled_text(row, tokenizer)
        assert 2 <= len(turns) <= 3 and all(turn.endswith("</s>\n") for turn in turns)  # every answer, and its EOS
        assert turns[-1] == row["response"] + "</s>\n"
        assert row["prompt"].endswith("<|assistant|>\n") and row["prompt"].startswith("<s>")


def test_sweep_run_refuses_bad_conversations_before_anything_runs(raw_config, write_config, tmp_path):
    from conftest import refused_case

    def change(raw, tmp):
        rows = rows_of("messages") + [{"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q2"}]}]
        raw["data"]["files"] = [write_jsonl(tmp / "chat.jsonl", rows)]

    refused_case("run", change, "1 of 31 conversations in column 'messages' are not usable; the first, line 31: "
                 "roles out of order", raw_config, write_config, tmp_path)


@pytest.mark.parametrize("setting, why", [({"search": {"metric": "rouge_l", "mode": "max"},
                                            "evaluation": {"metrics": ["rouge_l"]}},
                                           "search.metric rouge_l is scored on generated answers"),
                                          ({"evaluation": {"val_examples": 4}},
                                           "evaluation.val_examples 4 asks trials to answer")])
def test_text_data_cannot_be_scored_on_answers(raw_config, write_config, tmp_path, setting, why):
    from conftest import refused_case

    def change(raw, tmp):
        raw["data"]["files"] = [write_jsonl(tmp / "text.jsonl", rows_of("text"))]
        for section, values in setting.items():
            raw.setdefault(section, {}).update(values)

    refused_case("plan", change, f"`data.format`: text data has no prompts to answer (every token is trained on), "
                 f"but {why}", raw_config, write_config, tmp_path)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_answers_stop_at_the_chat_templates_end_of_turn_and_the_models_own_eos():
    """ChatML ends an assistant turn with <|im_end|>, not the tokenizer's EOS: the token that closes every trained
    answer is where generation stops, beside the EOS and what the model's generation config lists."""
    from types import SimpleNamespace

    from lora_sweep.evaluate import stop_token_ids
    from lora_sweep.testing.tiny_model import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    row = tokenize_segments(segments_for(TWO_TURNS, "chat", tokenizer), tokenizer, 512)
    closing = [ids[-2] for ids in labelled_runs(row)]
    assert closing == [end_of_turn, end_of_turn] and tokenizer.eos_token_id not in row["input_ids"]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[tokenizer.eos_token_id, 7]))
    assert stop_token_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, 7, end_of_turn})
    tokenizer.chat_template = None  # no template: the EOS (and the model's)
    assert stop_token_ids(SimpleNamespace(), tokenizer) == [tokenizer.eos_token_id]

