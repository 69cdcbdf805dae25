import optuna.distributions as od
import pytest

from lora_sweep.config import ConfigError, load_config
from lora_sweep.search_space import apply_params, build_search_space, shipped_spaces


def space_of(raw_config, write_config, parameters, space=None):
    raw_config["search"] = {"space": space, "parameters": parameters}
    return build_search_space(load_config(write_config(raw_config)))


def test_shipped_spaces_load_with_the_documented_ranges(raw_config, write_config):
    assert {"lora_default", "lr_only"} <= set(shipped_spaces())
    default = space_of(raw_config, write_config, {}, space="lora_default")
    lr = default["training.learning_rate"]
    assert isinstance(lr, od.FloatDistribution) and lr.log and (lr.low, lr.high) == (1e-5, 1e-3)
    assert default["lora.rank"].choices == (8, 16, 32, 64)
    assert set(default["lora.target_modules"].choices) == {"attention", "all-linear"}
    assert set(default) >= {"lora.alpha_multiple", "lora.dropout", "training.warmup_ratio",
                            "training.weight_decay", "training.batch_size"}
    assert list(space_of(raw_config, write_config, {}, space="lr_only")) == ["training.learning_rate"]


def test_inline_entries_override_the_file(raw_config, write_config):
    space = space_of(raw_config, write_config, {"training.learning_rate": {"type": "uniform", "low": 0.1, "high": 0.2}},
                     space="lr_only")
    assert space["training.learning_rate"] == od.FloatDistribution(0.1, 0.2)


def test_int_distribution(raw_config, write_config):
    space = space_of(raw_config, write_config, {"lora.rank": {"type": "int", "low": 4, "high": 16, "step": 4}})
    assert space["lora.rank"] == od.IntDistribution(4, 16, step=4)


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"training.learning_rate": {"type": "loguniform", "low": 0.0, "high": 1e-3}}, "log-uniform needs low > 0, but got 0.0"),
        ({"training.learning_rate": {"type": "uniform", "low": 0.5, "high": 0.1}}, "low must be <= high, but got low=0.5, high=0.1"),
        ({"lora.rank": {"type": "choice", "values": []}}, "`lora.rank`.values: must be a non-empty list"),
        ({"lora.rank": {"type": "choice", "values": [8, "big"]}}, "every value must be int, but got ['big']"),
        ({"lora.rnak": {"type": "choice", "values": [8]}}, "`lora.rnak`: not a tunable field"),
        ({"lora.dropout": {"type": "normal", "low": 0, "high": 1}}, "must be one of uniform, loguniform, int, choice, but got 'normal'"),
        ({"lora.dropout": {"type": "int", "low": 0, "high": 1}}, "int is only for integer fields"),
        ({"lora.dropout": {"type": "uniform", "low": "a", "high": 1}}, "`lora.dropout`.low: must be a number, but got 'a'"),
        ({"lora.dropout": {"type": "uniform", "low": 0.0, "high": 1.5}}, "`lora.dropout`: Input should be less than 1 (got 1.5) (a value the search space can pick)"),
        ({"lora.rank": {"type": "choice", "values": [0, 8]}}, "`lora.rank`: Input should be greater than or equal to 1 (got 0)"),
    ],
)
def test_bad_entries_are_named(raw_config, write_config, entry, expected):
    with pytest.raises(ConfigError) as caught:
        space_of(raw_config, write_config, entry)
    assert any(expected in p for p in caught.value.problems), caught.value.problems


def test_all_bad_entries_are_reported_together(raw_config, write_config):
    with pytest.raises(ConfigError) as caught:
        space_of(raw_config, write_config, {
            "lora.rank": {"type": "choice", "values": []},
            "training.learning_rate": {"type": "loguniform", "low": -1, "high": 1},
        })
    assert len(caught.value.problems) == 2


def test_unknown_space_name_lists_the_shipped_ones(raw_config, write_config):
    with pytest.raises(ConfigError, match="lora_default"):
        space_of(raw_config, write_config, {}, space="no_such_space")


def test_apply_params_writes_sampled_values_over_the_fixed_config(raw_config, write_config):
    config = load_config(write_config(raw_config))
    trial = apply_params(config, {"training.learning_rate": 0.01, "lora.rank": 4, "lora.target_modules": "all-linear"})
    assert (trial.training.learning_rate, trial.lora.rank, trial.lora.target_modules) == (0.01, 4, "all-linear")
    assert config.lora.rank == 8  # the fixed config is unchanged



def test_tpe_startup_trials_reach_the_sampler(raw_config, write_config, tmp_path):
    from lora_sweep.driver import make_search

    raw_config["search"] = {"space": "lr_only", "num_trials": 12}
    config = load_config(write_config(raw_config))
    assert config.search.startup_trials == 20  # chosen on the learning-curve tables (Optuna's own is 10)
    config = load_config(write_config(raw_config), ["search.startup_trials=3"])
    assert make_search(config, build_search_space(config), tmp_path)._sampler._n_startup_trials == 3


def test_lora_variants_are_searchable(raw_config, write_config):
    space = space_of(raw_config, write_config, {
        "lora.use_dora": {"type": "choice", "values": [True, False]},
        "lora.use_rslora": {"type": "choice", "values": [True, False]},
        "lora.init": {"type": "choice", "values": ["default", "gaussian", "pissa", "olora"]},
        "lora.loraplus_lr_ratio": {"type": "loguniform", "low": 1.0, "high": 32.0},
    })
    assert space["lora.use_dora"].choices == (True, False)
    assert space["lora.loraplus_lr_ratio"] == od.FloatDistribution(1.0, 32.0, log=True)
    with pytest.raises(ConfigError, match=r"`lora.init`.*'loftq'"):
        space_of(raw_config, write_config, {"lora.init": {"type": "choice", "values": ["gaussian", "loftq"]}})
    # A value that clashes with the fixed config is refused before any trial: PiSSA on a 4-bit base.
    raw_config["model"]["quantization"] = "nf4"
    raw_config["resources"] = {"gpu": 1}
    with pytest.raises(ConfigError, match=r"lora.init pissa rewrites the base weights.*a value the search space can pick"):
        space_of(raw_config, write_config, {"lora.init": {"type": "choice", "values": ["default", "pissa"]}})


def test_a_suggestion_asked_after_the_last_snapshot_is_handed_out_again_on_restore(raw_config, write_config, tmp_path):
    # The driver is killed after the searcher asked the study for trial C but before Tune's next snapshot:
    # on resume Tune knows A and B only and asks for a new trial. It must get C's study trial, not a new one.
    import optuna

    from lora_sweep.driver import make_search

    raw_config["search"] = {"space": "lr_only", "num_trials": 3}
    config = load_config(write_config(raw_config))
    search = make_search(config, build_search_space(config), tmp_path)
    first = [search.suggest("A"), search.suggest("B")]
    search.save(str(tmp_path / "snapshot.pkl"))
    lost = search.suggest("C")
    restored = make_search(config, build_search_space(config), tmp_path)
    restored.restore(str(tmp_path / "snapshot.pkl"))
    assert [restored.suggest("A"), restored.suggest("B")] == first  # known trials keep theirs
    assert restored.suggest("D") == lost  # the study trial asked before the kill, not a new one
    fresh = restored.suggest("E")  # after that, new suggestions as usual
    study = optuna.load_study(study_name=config.name, storage=f"sqlite:///{tmp_path / 'optuna_study.db'}")
    assert len(study.trials) == 4 and fresh != lost
    (tmp_path / "uninterrupted").mkdir()  # and the same as a sweep never killed would have suggested 4th
    uninterrupted = make_search(config, build_search_space(config), tmp_path / "uninterrupted")
    assert [uninterrupted.suggest(t) for t in "ABCE"] == [*first, lost, fresh]
    restored.on_trial_complete("D", {"eval_loss": 1.0})
    assert study.trials[2].state == optuna.trial.TrialState.COMPLETE and study.trials[2].value == 1.0
