"""Warm start: an earlier sweep's best configs run first in a new sweep."""

import optuna
import pytest
import yaml

from lora_sweep.config import ConfigError, config_to_yaml, load_config
from lora_sweep.search_space import build_search_space
from lora_sweep.warm_start import warm_start_points

from conftest import leaderboard_record, new_sweep


def test_best_configs_first_with_fields_the_earlier_sweep_fixed(raw_config, write_config, earlier_sweep):
    warm = warm_start_points(*new_sweep(raw_config, write_config, earlier_sweep))
    # Best first; the errored trial is left out; rank (fixed at 4 there) comes from the earlier config.
    assert warm.sources == ["t_best", "t_second"]
    assert warm.points == [{"training.learning_rate": 3e-3, "lora.rank": 4},
                           {"training.learning_rate": 1e-3, "lora.rank": 4}]
    assert warm.skipped == [
        "trial t_same: the same config as trial t_second",
        "trial t_far: `training.learning_rate` = 0.05 is outside this sweep's space (log-uniform in [0.0001, 0.01])",
    ]


def test_top_limits_the_seeds(raw_config, write_config, earlier_sweep):
    warm = warm_start_points(*new_sweep(raw_config, write_config, earlier_sweep, top=1))
    assert warm.sources == ["t_best"] and warm.skipped == []


def test_a_space_no_earlier_config_fits_is_an_error(raw_config, write_config, earlier_sweep):
    config, space = new_sweep(raw_config, write_config, earlier_sweep,
                              **{"lora.rank": {"type": "choice", "values": [16, 32]}})
    with pytest.raises(ConfigError, match=r"no config of .*earlier can seed this sweep .*`lora.rank` = 4 is outside"):
        warm_start_points(config, space)


def test_refusals_name_the_field(raw_config, write_config, earlier_sweep, tmp_path):
    with pytest.raises(ConfigError, match=r"`search.warm_start.sweep`: .*nowhere is not a sweep folder"):
        warm_start_points(*new_sweep(raw_config, write_config, tmp_path / "nowhere"))
    (earlier_sweep / "leaderboard.csv").unlink()
    with pytest.raises(ConfigError, match=r"has no leaderboard.csv: its trials have not ended"):
        warm_start_points(*new_sweep(raw_config, write_config, earlier_sweep))
    raw_config["search"] = {"space": None, "num_trials": 2, "warm_start": {"sweep": str(earlier_sweep), "top": 3}}
    with pytest.raises(ConfigError, match=r"search.warm_start.top must be <= search.num_trials \(2\), but got 3"):
        load_config(write_config(raw_config))
    raw_config["search"]["warm_start"]["top"] = 1
    config = load_config(write_config(raw_config))
    with pytest.raises(ConfigError, match=r"`search.warm_start`: this sweep searches nothing"):
        warm_start_points(config, build_search_space(config))


def test_relative_folder_is_stored_absolute(raw_config, write_config, earlier_sweep, monkeypatch):
    monkeypatch.chdir(earlier_sweep.parent)
    raw_config["search"]["warm_start"] = {"sweep": "earlier", "top": 1}
    assert load_config(write_config(raw_config)).search.warm_start.sweep == str(earlier_sweep)




def test_plan_lists_what_runs_first_and_what_was_skipped(raw_config, write_config, earlier_sweep):
    from typer.testing import CliRunner

    from lora_sweep.cli import app

    new_sweep(raw_config, write_config, earlier_sweep)
    result = CliRunner().invoke(app, ["plan", str(write_config(raw_config))])
    assert result.exit_code == 0, result.output
    assert "warm start: 2 configs of an earlier sweep run first:" in result.output
    assert "  trial t_best: lora.rank=4, training.learning_rate=0.003" in result.output
    assert "  skipped trial t_far: `training.learning_rate` = 0.05 is outside" in result.output


def test_values_match_the_spaces_own_choices(raw_config, write_config, earlier_sweep):
    """The shipped default space lists alpha multiples as [0.5, 1, 2, 4]; the config holds 2.0: a match."""
    from lora_sweep.warm_start import OUTSIDE, in_space

    choices = optuna.distributions.CategoricalDistribution([0.5, 1, 2, 4])
    assert in_space(choices, 2.0) == 2 and type(in_space(choices, 2.0)) is int
    assert in_space(optuna.distributions.CategoricalDistribution([1, 2]), True) is OUTSIDE
    assert in_space(optuna.distributions.CategoricalDistribution([True, False]), True) is True
    assert in_space(optuna.distributions.CategoricalDistribution(["attention", "mlp"]), "mlp") == "mlp"
    config, space = new_sweep(raw_config, write_config, earlier_sweep, top=1,
                              **{"lora.alpha_multiple": {"type": "choice", "values": [0.5, 1, 2, 4]}})
    assert warm_start_points(config, space).points == [{"lora.alpha_multiple": 2}]  # the earlier config's default


def test_the_exported_best_config_runs_without_the_warm_start(raw_config, write_config, earlier_sweep):
    from lora_sweep.export import best_trial_config

    config, _ = new_sweep(raw_config, write_config, earlier_sweep, top=3)
    best = leaderboard_record("t", "completed", 1.0, **{"training.learning_rate": 1e-3, "lora.rank": 4})
    rerun = best_trial_config(config, best)
    assert rerun.search.warm_start is None
    load_config(write_config(yaml.safe_load(config_to_yaml(rerun)), "best.yaml"))  # valid as written
