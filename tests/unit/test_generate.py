"""`sweep generate`: the exported model answers with the sweep's template, streamed, as the final evaluation decodes."""

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lora_sweep.cli import app
from lora_sweep.config import config_to_yaml, load_config
from lora_sweep.data import tokenize_example, tokenize_segments
from lora_sweep.evaluate import greedy_completions
from lora_sweep.generate import ExportedModel
from lora_sweep.templates import Conversation, Example, Message, render_default, segments_for


@pytest.fixture
def exported_sweep(raw_config, write_config, tiny_model_dir):
    raw_config["data"]["default_system"] = "Answer with the word only."
    config = load_config(write_config(raw_config))
    sweep_dir = config.sweep_dir
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "config.yaml").write_text(config_to_yaml(config))
    (sweep_dir / "provenance.json").write_text(json.dumps({"data_path": "unused"}))
    shutil.copytree(tiny_model_dir, sweep_dir / "export" / "merged")
    return sweep_dir


def test_answer_is_streamed_and_matches_the_final_evaluations_greedy_decoding(exported_sweep, tiny_model_dir):
    model = ExportedModel(exported_sweep)
    example = Example(instruction="Repeat the word.", input="hello", response="", system="Answer with the word only.")
    pieces = list(model.stream(example, max_new_tokens=8))
    assert len(pieces) > 1  # streamed piece by piece, not in one go

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    # The prompt as training and the final evaluation tokenize it (the response is not part of it).
    prompt = tokenize_example(Example(**{**example.__dict__, "response": "x"}), render_default, tokenizer, 512)
    prompt_ids = prompt["input_ids"][: prompt["prompt_length"]]
    expected = greedy_completions(reference, tokenizer, [prompt_ids], max_new_tokens=8, batch_size=1)[0]
    assert "".join(pieces).strip() == expected


def test_cli_question_uses_the_sweeps_default_system(exported_sweep, monkeypatch):
    seen = []
    monkeypatch.setattr(ExportedModel, "stream", lambda self, example, *a: (seen.append(example), iter(["ok"]))[1])
    result = CliRunner().invoke(app, ["generate", str(exported_sweep), "Repeat the word.", "--input", "abc"])
    assert result.exit_code == 0, result.output
    assert result.output == "ok\n"
    assert seen == [Example(instruction="Repeat the word.", input="abc", response="", system="Answer with the word only.")]


def test_cli_file_of_prompts_gives_one_json_line_each(exported_sweep, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Repeat the word.", "input": "abc"}\n{"instruction": "Spell it backwards.", "input": "xyz"}\n')
    result = CliRunner().invoke(app, ["generate", str(exported_sweep), "--file", str(prompts), "--json",
                                      "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [(line["instruction"], line["input"]) for line in lines] == [("Repeat the word.", "abc"), ("Spell it backwards.", "xyz")]
    assert all(isinstance(line["answer"], str) for line in lines)


def test_cli_refuses_missing_input_and_missing_export(exported_sweep, tmp_path):
    result = CliRunner().invoke(app, ["generate", str(exported_sweep)])
    assert result.exit_code == 2 and "either a QUESTION or --file" in result.output
    shutil.rmtree(exported_sweep / "export")
    result = CliRunner().invoke(app, ["generate", str(exported_sweep), "Hi"])
    assert result.exit_code == 2 and "the sweep has no export yet" in result.output
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"question": "Hi"}\n')
    result = CliRunner().invoke(app, ["generate", str(exported_sweep), "--file", str(prompts)])
    assert result.exit_code == 2
    assert "`--file`: no `instruction` column (the sweep's data.columns.instruction); the file has ['question']" in result.output
    prompts.write_text('{"instruction": "Hi"}\n{"instruction": ""}\n')
    result = CliRunner().invoke(app, ["generate", str(exported_sweep), "--file", str(prompts)])
    assert result.exit_code == 2 and "`instruction`: empty in row(s) [2]" in result.output
    result = CliRunner().invoke(app, ["generate", str(exported_sweep), "--file", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "`--file`: prompts file not found" in result.output


def test_a_failure_inside_generation_is_raised_not_waited_on(exported_sweep, monkeypatch):
    model = ExportedModel(exported_sweep)

    def out_of_memory(**kwargs):
        raise RuntimeError("out of memory while generating")

    monkeypatch.setattr(model.model, "generate", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory while generating"):
        list(model.stream(Example(instruction="Hi", response=""), max_new_tokens=4))


def test_answers_that_cannot_fit_the_models_positions_are_refused_before_generating(exported_sweep, tmp_path):
    from conftest import assert_refused

    positions = ExportedModel(exported_sweep).positions()
    assert positions
    result = CliRunner().invoke(app, ["generate", str(exported_sweep), "hi", "--max-new-tokens", "99999999999999999999"])
    assert_refused(result, f"`--max-new-tokens`: 99999999999999999999 is not below the model's {positions} positions")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "Repeat the word."}) + "\n"
                       + json.dumps({"instruction": "x" * 2_000_000}) + "\n")
    result = CliRunner().invoke(app, ["generate", str(exported_sweep), "--file", str(prompts)])
    assert_refused(result, f"prompt 2: about 31,250 tokens with --max-new-tokens 128 is more than the model's {positions}")
    assert "Repeat" not in result.output  # nothing was answered before the refusal


@pytest.mark.parametrize("option, value, expected", [
    ("--temperature", "-1", "`--temperature`: must be a finite number >= 0 (0 decodes greedily), but got -1.0"),
    ("--temperature", "nan", "`--temperature`: must be a finite number >= 0"),
    ("--max-new-tokens", "0", "`--max-new-tokens`: must be at least 1, but got 0"),
])
def test_bad_generation_options_are_refused_in_one_line(exported_sweep, option, value, expected):
    from conftest import assert_refused

    assert_refused(CliRunner().invoke(app, ["generate", str(exported_sweep), "hi", option, value]), expected)


@pytest.fixture
def messages_sweep(exported_sweep):
    """The exported sweep as if trained on `messages` conversations with the default template."""
    (exported_sweep / "provenance.json").write_text(json.dumps({"data_path": "unused", "data_format": "messages",
                                                                "template": "default"}))
    return exported_sweep


def _prompts_seen(monkeypatch) -> list[list[int]]:
    """The token ids each answer would be prompted with."""
    seen: list[list[int]] = []

    def stream(self, sample, *args):
        seen.append(self.prompt(sample))
        return iter(["ok"])

    monkeypatch.setattr(ExportedModel, "stream", stream)
    return seen


def test_a_file_of_conversations_is_prompted_as_the_sweep_trained_on_them(messages_sweep, tmp_path, monkeypatch):
    seen = _prompts_seen(monkeypatch)
    ask = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Repeat: abc"}]
    prompts = tmp_path / "prompts.jsonl"
    # The same question twice: ending with the user's turn, and with an answer to be given anew.
    prompts.write_text(json.dumps({"messages": ask}) + "\n"
                       + json.dumps({"messages": [*ask, {"role": "assistant", "content": "abc"}]}) + "\n")
    result = CliRunner().invoke(app, ["generate", str(messages_sweep), "--file", str(prompts), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [line["messages"] for line in lines] == [ask, ask] and [line["answer"] for line in lines] == ["ok", "ok"]
    trained = Conversation(tuple(Message(t["role"], t["content"]) for t in ask) + (Message("assistant", "abc"),))
    tokenizer = AutoTokenizer.from_pretrained(messages_sweep / "export" / "merged")
    # Token for token what training prompted the last answer with: the earlier answer closed by its EOS.
    tokenized = tokenize_segments(segments_for(trained, "default", tokenizer), tokenizer, 4096)
    expected = tokenized["input_ids"][:tokenized["prompt_length"]]
    assert seen == [expected, expected]
    text = tokenizer.decode(expected)
    assert text.rstrip().endswith("### Response:") and "Repeat: abc" in text and f"Hello{tokenizer.eos_token}" in text

    # --system replaces the conversation's own system turn; the heading names the last user turn.
    seen.clear()
    result = CliRunner().invoke(app, ["generate", str(messages_sweep), "--file", str(prompts), "--system", "Terse."])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["### Repeat: abc", "ok"] * 2
    tokenizer = AutoTokenizer.from_pretrained(messages_sweep / "export" / "merged")
    assert all("Terse." in tokenizer.decode(ids) and "Be brief." not in tokenizer.decode(ids) for ids in seen)


def test_a_messages_sweep_still_answers_instruction_columns(messages_sweep, tmp_path, monkeypatch):
    seen = _prompts_seen(monkeypatch)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("instruction,input\nRepeat the word.,abc\n")
    result = CliRunner().invoke(app, ["generate", str(messages_sweep), "--file", str(prompts), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"instruction": "Repeat the word.", "input": "abc", "answer": "ok"}
    text = AutoTokenizer.from_pretrained(messages_sweep / "export" / "merged").decode(seen[0])
    assert "Repeat the word.\n\nabc" in text and text.rstrip().endswith("### Response:")


def test_bad_conversations_in_a_prompts_file_are_refused_with_the_first_line(messages_sweep, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n"
                       + json.dumps({"messages": [{"role": "robot", "content": "Hi"}]}) + "\n")
    result = CliRunner().invoke(app, ["generate", str(messages_sweep), "--file", str(prompts)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "1 of 2 conversations in column 'messages' are not usable; the first, line 2: turn 1 has an unknown role 'robot'" \
        in " ".join(result.output.split()), result.output

    prompts.write_text('{"question": "Hi"}\n')
    result = CliRunner().invoke(app, ["generate", str(messages_sweep), "--file", str(prompts)])
    assert result.exit_code == 2
    assert "no `instruction` column (the sweep's data.columns.instruction) or `messages` (the sweep's data format, " \
        "messages)" in " ".join(result.output.split()), result.output


def test_a_prompt_completion_sweep_answers_a_prompt_column(exported_sweep, tmp_path, monkeypatch):
    (exported_sweep / "provenance.json").write_text(json.dumps({"data_path": "unused",
                                                                "data_format": "prompt_completion"}))
    seen = _prompts_seen(monkeypatch)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The capital of France is"}\n{"prompt": ""}\n')
    result = CliRunner().invoke(app, ["generate", str(exported_sweep), "--file", str(prompts), "--json"])
    assert result.exit_code == 2 and "1 of 2 prompts are empty" in result.output, result.output
    prompts.write_text('{"prompt": "The capital of France is"}\n')
    result = CliRunner().invoke(app, ["generate", str(exported_sweep), "--file", str(prompts), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"prompt": "The capital of France is", "answer": "ok"}
    tokenizer = AutoTokenizer.from_pretrained(exported_sweep / "export" / "merged")
    assert seen == [tokenizer("The capital of France is")["input_ids"]]  # with BOS, as a prompt_completion row
