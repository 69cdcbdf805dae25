"""The trial as a recipe: picked by the config's `trainable`, run as setup -> train -> cleanup whatever happens."""

import typing

import pytest

from lora_sweep import recipe
from lora_sweep.config import ConfigError, TrainableName, load_config
from lora_sweep.recipe import ListReporter, Recipe, TrialOutcome, run_trial
from lora_sweep.trainables import TRAINABLES
from lora_sweep.trainables.lora_causal_lm import LoraCausalLM


def test_the_config_names_exactly_the_shipped_recipes(raw_config, write_config):
    assert set(TRAINABLES) == set(typing.get_args(TrainableName)) == {"lora_causal_lm"}
    assert TRAINABLES["lora_causal_lm"] is LoraCausalLM
    assert load_config(write_config(raw_config)).trainable == "lora_causal_lm"  # the default


def test_an_unknown_trainable_is_refused_naming_the_field_and_the_choices(raw_config, write_config):
    raw_config["trainable"] = "lora_seq2seq"
    with pytest.raises(ConfigError) as error:
        load_config(write_config(raw_config))
    message = str(error.value)
    assert "`trainable`" in message and "lora_seq2seq" in message and "lora_causal_lm" in message


class Scripted(Recipe):
    """A recipe that records its calls and fails where a test asks it to."""

    name = "scripted"
    calls: list[str] = []
    fail_in: str | None = None

    def _step(self, name: str) -> None:
        Scripted.calls.append(name)
        if Scripted.fail_in == name:
            raise RuntimeError(f"{name} failed")

    def setup(self) -> None:
        self._step("setup")

    def train(self) -> TrialOutcome:
        self._step("train")
        self.reporter.report({"step": 1, "seed": self.config.seed, "lr": self.config.training.learning_rate}, None)
        return TrialOutcome(steps=1, diverged_reason=None, best_metric=None)

    def cleanup(self) -> None:
        Scripted.calls.append("cleanup")


@pytest.mark.parametrize("fail_in, calls", [(None, ["setup", "train", "cleanup"]),
                                            ("setup", ["setup", "cleanup"]),
                                            ("train", ["setup", "train", "cleanup"])])
def test_run_trial_runs_the_configs_recipe_and_always_cleans_up(raw_config, write_config, monkeypatch, fail_in, calls):
    monkeypatch.setitem(TRAINABLES, "lora_causal_lm", Scripted)
    monkeypatch.setattr(Scripted, "calls", [])
    monkeypatch.setattr(Scripted, "fail_in", fail_in)
    base = load_config(write_config(raw_config)).model_dump()
    reporter = ListReporter()
    if fail_in is None:
        outcome = run_trial({"training.learning_rate": 3e-3}, base, "unused", reporter)
        assert outcome.steps == 1
        assert reporter.reports == [{"step": 1, "seed": 0, "lr": 3e-3}]  # the trial's params are applied
    else:
        with pytest.raises(RuntimeError, match=f"{fail_in} failed"):
            run_trial({}, base, "unused", reporter)
    assert Scripted.calls == calls


def test_recipe_lookup_is_by_name():
    assert recipe.recipe_named("lora_causal_lm") is LoraCausalLM
    with pytest.raises(KeyError):
        recipe.recipe_named("nope")
