from pathlib import Path

import pytest

from lora_sweep.config import ConfigError, load_config

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


def problems_of(path, overrides=None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return caught.value.problems


def test_demo_config_is_valid_and_paths_resolve_relative_to_it():
    config = load_config(DEMO)
    assert config.name == "demo"
    assert Path(config.model.path).is_dir()
    assert Path(config.data.files[0]).is_file()
    assert config.search.space == "lora_default"


def test_overrides_are_parsed_as_yaml_values(raw_config, write_config):
    config = load_config(write_config(raw_config), ["training.learning_rate=3e-4", "search.num_trials=5", "lora.target_modules=[q_proj]"])
    assert config.training.learning_rate == pytest.approx(3e-4)
    assert config.search.num_trials == 5
    assert config.lora.target_modules == ["q_proj"]


def test_unknown_key_is_an_error_with_the_closest_valid_key(raw_config, write_config):
    raw_config["training"]["learning_rat"] = 0.1
    (problem,) = problems_of(write_config(raw_config))
    assert "`training.learning_rat`" in problem
    assert "did you mean `learning_rate`" in problem


def test_every_error_is_reported_at_once_with_field_value_and_rule(raw_config, write_config):
    raw_config["training"]["learning_rate"] = -1
    raw_config["training"]["batch_size"] = "eight"
    raw_config["search"]["metric"] = "accuracy"
    raw_config["resources"] = {"gpu": 1.5}
    problems = problems_of(write_config(raw_config))
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "`training.learning_rate`" in text and "greater than 0" in text and "-1" in text
    assert "`training.batch_size`" in text and "'eight'" in text
    assert "`search.metric`" in text and "'accuracy'" in text and "eval_loss" in text
    assert "`resources.gpu`" in text and "1.5" in text


def test_split_fractions_must_sum_to_one(raw_config, write_config):
    raw_config["data"]["split"] = {"train": 0.7, "val": 0.2, "test": 0.2}
    (problem,) = problems_of(write_config(raw_config))
    assert "`data.split`" in problem and "sum to 1" in problem and "1.1" in problem


def test_grace_period_beyond_max_steps_is_rejected(raw_config, write_config):
    raw_config["scheduler"]["grace_period"] = 100
    (problem,) = problems_of(write_config(raw_config))
    assert "scheduler.grace_period" in problem and "100" in problem and "max_steps (6)" in problem


def test_missing_required_fields_are_named(tmp_path, write_config):
    problems = problems_of(write_config({"name": "x"}))
    assert any("`model`" in p and "missing" in p for p in problems)
    assert any("`data`" in p and "missing" in p for p in problems)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {path: a\n")
    (problem,) = problems_of(path)
    assert "YAML syntax error at line" in problem


def test_missing_config_file(tmp_path):
    (problem,) = problems_of(tmp_path / "nope.yaml")
    assert "not found" in problem


def test_bad_override_syntax(raw_config, write_config):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(write_config(raw_config), ["training.learning_rate"])
