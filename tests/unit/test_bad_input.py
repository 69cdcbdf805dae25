"""Every bad input is refused by `sweep run` before Ray starts: exit 2, one line per problem, nothing written."""

import json

import pytest
from typer.testing import CliRunner

from conftest import refused_case
from lora_sweep.cli import app


def _missing_column_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"Say {i}.", "response": str(i)} for i in range(10)]
    rows[3] = {"instruction": "Say 3."}
    rows[7] = {"instruction": "Say 7."}
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _malformed_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c", "response": }\n')
    return str(path)


def _not_a_causal_lm(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "vit")
    return str(tmp_path / "vit")


# (what to change, text the one error line must contain)
CASES = {
    "unknown key": (lambda raw, tmp: raw["training"].update(learning_rat=0.1), "`training.learning_rat`: unknown key (did you mean `learning_rate`?)"),
    "wrong type": (lambda raw, tmp: raw["training"].update(batch_size="eight"), "`training.batch_size`: Input should be a valid integer"),
    "low above high": (lambda raw, tmp: raw["search"].update(parameters={"lora.dropout": {"type": "uniform", "low": 0.1, "high": 0.01}}), "`lora.dropout`: low must be <= high, but got low=0.1, high=0.01"),
    "log-uniform low <= 0": (lambda raw, tmp: raw["search"].update(parameters={"training.learning_rate": {"type": "loguniform", "low": 0, "high": 1}}), "log-uniform needs low > 0, but got 0"),
    "empty choice": (lambda raw, tmp: raw["search"].update(parameters={"lora.rank": {"type": "choice", "values": []}}), "`lora.rank`.values: must be a non-empty list, but got []"),
    "missing data file": (lambda raw, tmp: raw["data"].update(files=[str(tmp / "nope.jsonl")]), "`data.files`: file not found"),
    "malformed JSONL": (lambda raw, tmp: raw["data"].update(files=[_malformed_jsonl(tmp)]), "bad.jsonl: line 3: not valid JSON"),
    "rows missing columns": (lambda raw, tmp: raw["data"].update(files=[_missing_column_rows(tmp)]), "2 of 10 rows lack required column(s) ['response']; the first is line 4"),
    "every row too long": (lambda raw, tmp: raw["data"].update(max_length=10), "`data.max_length`: every one of the"),
    "fractions not summing to 1": (lambda raw, tmp: raw["data"].update(split={"train": 0.5, "val": 0.1, "test": 0.1}), "train + val + test must sum to 1, but got 0.7"),
    "an empty split": (lambda raw, tmp: raw["data"].update(split={"train": 0.9, "val": 0.1, "test": 0.0}), "`test` must be > 0 so that split is not empty, but got 0.0"),
    "missing model path": (lambda raw, tmp: raw["model"].update(path=str(tmp / "no-model")), "`model.path`: folder not found"),
    "a folder that is not a model": (lambda raw, tmp: (tmp.joinpath("empty").mkdir(), raw["model"].update(path=str(tmp / "empty"))), "`model.path`: cannot load a model config from"),
    "not a causal LM": (lambda raw, tmp: raw["model"].update(path=_not_a_causal_lm(tmp)), "is not a causal LM"),
    "target modules not found": (lambda raw, tmp: raw.update(lora={"target_modules": ["c_attn"]}), "['c_attn'] not found in the model; its linear modules are ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
    "resources beyond the cluster": (lambda raw, tmp: raw.update(resources={"cpu": 8, "gpu": 0}), "`resources.cpu`: a trial asks for 8.0 CPUs but this machine's Ray has 2"),
    "workers beyond the machine": (lambda raw, tmp: raw.update(resources={"cpu": 1, "workers": 3}), "`resources.cpu`: a trial's 3 workers ask for 3.0 CPUs but this machine's Ray has 2"),
    "a GPU that is not there": (lambda raw, tmp: raw.update(resources={"cpu": 1, "gpu": 1}), "`resources.gpu`: a trial asks for 1.0 GPUs but this machine's Ray has 0"),
    "a metric never reported": (lambda raw, tmp: raw["search"].update(metric="accuracy"), "`search.metric`: must be one the trainable reports"),
    "output folder not writable": (lambda raw, tmp: (tmp.joinpath("a-file").write_text("x"), raw.update(output_dir=str(tmp / "a-file" / "results"))), "a-file is a file, so"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_naming_it_and_writes_nothing(case, raw_config, write_config, tmp_path):
    result = refused_case("run", *CASES[case], raw_config, write_config, tmp_path)
    (line,) = result.output.strip().splitlines()
    assert str(tmp_path / "sweep.yaml") in line or "bad.jsonl" in line or "rows.jsonl" in line, line  # names its file
    assert not (tmp_path / "results").exists()


def test_config_file_problems(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "syntax.yaml").write_text("name: x\nmodel: [unclosed\n")
    expectations = {
        "missing.yaml": "config file not found",
        "folder.yaml": "config path is a folder, not a file",
        "syntax.yaml": "YAML syntax error at line 3",
    }
    for name, expected in expectations.items():
        result = CliRunner().invoke(app, ["run", str(tmp_path / name)])
        assert result.exit_code == 2 and expected in result.output and name in result.output, result.output


def test_several_problems_are_reported_together_one_line_each(raw_config, write_config):
    raw_config["training"]["learning_rate"] = 0
    raw_config["training"]["eval_steps"] = 0
    raw_config["lora"] = {"dropout": 2}
    result = CliRunner().invoke(app, ["run", str(write_config(raw_config))])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert {"`training.learning_rate`", "`training.eval_steps`", "`lora.dropout`"} == {line.split(": ")[2] for line in lines}


def test_trust_remote_code_warns(raw_config, write_config, caplog):
    raw_config["model"]["trust_remote_code"] = True
    raw_config["data"]["max_length"] = 10  # stop right after the warning, before any compute
    CliRunner().invoke(app, ["run", str(write_config(raw_config))])
    assert "trust_remote_code is on" in caplog.text
