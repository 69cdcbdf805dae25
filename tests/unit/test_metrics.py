"""Task metrics (`evaluation.metrics`): each built-in against hand-computed values, a custom metric, bad metric
modules refused before anything runs, and the paired bootstrap interval of tuned minus base."""

import pytest

from lora_sweep import metrics
from lora_sweep.config import ConfigError, EvaluationConfig
from lora_sweep.metrics import BUILT_IN_METRICS, compute, paired_bootstrap

from conftest import listing, refused_case


def test_exact_match_compares_stripped_answers():
    assert metrics.exact_match(["a", " b ", "c"], ["a", "b", "x"]) == pytest.approx(2 / 3)


def test_token_f1_is_squads():
    # "The cat sat." -> [cat, sat] (article and punctuation dropped); "cat sat down" -> [cat, sat, down]:
    # 2 common tokens, precision 1, recall 2/3, F1 0.8. A second example with no common token scores 0.
    assert metrics.token_f1(["The cat sat.", "dog"], ["cat sat down", "bird"]) == pytest.approx(0.4)
    assert metrics.token_f1(["", "a"], ["", "the"]) == pytest.approx(1.0)  # both empty after normalising: a match


def test_rouge_l_is_the_lcs_f_measure():
    # LCS of "the cat sat" and "the cat sat on the mat" is 3 tokens: precision 3/3, recall 3/6, F = 2/3.
    assert metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert metrics.rouge_l(["x y"], ["y x"]) == pytest.approx(0.5)  # LCS 1 of 2 either way


def test_bleu_is_sacrebleus_corpus_bleu():
    assert metrics.bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    # 1- to 4-gram precisions 4/5, 3/4, 2/3, 1/2 and equal lengths (no brevity penalty): 100 * (0.2)^(1/4).
    assert metrics.bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25)


def test_chrf_is_sacrebleus_character_f_score():
    assert metrics.chrf(["abc"], ["abc"]) == pytest.approx(100.0)
    # Character 1-, 2-, 3-grams of "abc" against "abd": precision = recall = 2/3, 1/2, 0 -> mean 7/18.
    assert metrics.chrf(["abc"], ["abd"]) == pytest.approx(100 * 7 / 18)


def test_the_config_knows_the_same_built_ins():
    with pytest.raises(ValueError, match=r"\['accuracy'\] are not built-in metrics \(exact_match, token_f1, rouge_l, "
                                         r"bleu, chrf\) nor module:function"):
        EvaluationConfig(metrics=["accuracy"])
    with pytest.raises(ValueError, match="each metric once"):
        EvaluationConfig(metrics=["bleu", "bleu"])
    assert set(EvaluationConfig(metrics=list(BUILT_IN_METRICS)).metrics) == set(metrics.BUILT_IN)
    assert EvaluationConfig().metrics == ["exact_match"]


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def length_ratio(predictions, references):\n"
        "    return sum(len(p) for p in predictions) / max(1, sum(len(r) for r in references))\n"
        "def both(predictions, references):\n"
        "    return {'starts_same': sum(p[:1] == r[:1] for p, r in zip(predictions, references)) / len(references),\n"
        "            'count': len(references)}\n"
        "def text(predictions, references):\n    return 'high'\n"
        "def broken(predictions, references):\n    raise ZeroDivisionError('oops')\n"
        "def nan(predictions, references):\n    return float('nan')\n"
        "def inf(predictions, references):\n    return {'x': float('inf')}\n"
        "def numpy_scalar(predictions, references):\n    import numpy\n    return numpy.float32(0.5)\n"
        "def diverged(predictions, references):\n    return {'diverged': 1.0, 'tokens_seen': 2.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    metrics.load_custom.cache_clear()
    yield tmp_path
    metrics.load_custom.cache_clear()


def test_a_custom_metric_by_module_or_by_file(custom_module):
    assert compute(["my_metrics:length_ratio"], ["ab", "c"], ["abc", "d"]) == {"length_ratio": pytest.approx(0.75)}
    by_file = f"{custom_module / 'my_metrics.py'}:both"
    assert compute([by_file, "exact_match"], ["ab", "x"], ["ac", "x"]) == {
        "starts_same": 1.0, "count": 2.0, "exact_match": 0.5}
    assert metrics.check_metrics([by_file]) == ["starts_same", "count"]


@pytest.mark.parametrize("spec, expected", [
    ("no_such_module:f", "cannot import 'no_such_module' (ModuleNotFoundError"),
    ("my_metrics:missing", "'my_metrics' has no function 'missing'"),
    ("my_metrics:text", "returned 'high'; a metric returns a float or a dict of floats"),
    ("/nowhere/m.py:f", "cannot import '/nowhere/m.py' (ImportError: no such file"),
    ("my_metrics:broken", "'my_metrics:broken' failed: ZeroDivisionError: oops (called on one sample answer before "
                          "anything runs)"),
    ("my_metrics:nan", "{'nan': nan} on a sample answer; a metric returns finite numbers"),
    ("my_metrics:inf", "{'x': inf} on a sample answer; a metric returns finite numbers"),
])
def test_a_bad_metric_module_is_a_config_error(custom_module, spec, expected):
    with pytest.raises(ConfigError, match="`evaluation.metrics`") as error:
        metrics.check_metrics([spec])
    assert expected in str(error.value)


def test_a_numpy_scalar_is_a_float_and_engine_keys_are_reserved(custom_module):
    from lora_sweep.trial_report import RESERVED_KEYS

    assert compute(["my_metrics:numpy_scalar"], ["a"], ["a"]) == {"numpy_scalar": 0.5}
    with pytest.raises(ConfigError, match=r"reports \['diverged', 'tokens_seen'\], a name the engine reports itself"):
        metrics.check_metrics(["my_metrics:diverged"], reserved=RESERVED_KEYS)


def test_a_custom_metric_may_not_take_an_engine_name_or_a_name_twice(custom_module):
    with pytest.raises(ConfigError, match=r"reports \['count'\], a name the engine reports itself"):
        metrics.check_metrics(["my_metrics:both"], reserved=("count",))
    with pytest.raises(ConfigError, match=r"more than one metric reports \['starts_same', 'count'\]"):
        metrics.check_metrics(["my_metrics:both", f"{custom_module / 'my_metrics.py'}:both"])


def test_a_metric_failing_on_real_answers_names_itself(custom_module):
    with pytest.raises(RuntimeError, match="'my_metrics:broken' failed: ZeroDivisionError: oops"):
        compute(["my_metrics:broken"], ["a"], ["a"])


def test_sweep_run_refuses_a_bad_metric_before_anything_runs(raw_config, write_config, tmp_path, custom_module):
    def change(raw, _):
        raw["evaluation"] = {"metrics": ["rouge_l", "my_metrics.py:text"]}  # relative to the config file

    refused_case("run", change, "`evaluation.metrics`: ", raw_config, write_config, tmp_path)
    assert "my_metrics.py" in listing(tmp_path)


def test_the_paired_bootstrap_interval_is_of_the_difference():
    references = ["yes"] * 40
    base, tuned = ["no"] * 40, ["yes"] * 40
    (d,) = paired_bootstrap(["exact_match"], base, tuned, references, resamples=200).values()
    assert (d.base, d.tuned, d.difference, d.low, d.high) == (0.0, 1.0, 1.0, 1.0, 1.0)
    # Half the answers improve, none gets worse: the difference is 0.5, its interval around it and above 0.
    tuned = ["yes"] * 20 + ["no"] * 20
    result = paired_bootstrap(["exact_match", "token_f1"], base, tuned, references, resamples=500, seed=1)
    for d in result.values():
        assert d.difference == pytest.approx(0.5) and 0.0 < d.low < 0.5 < d.high < 1.0 and d.resamples == 500
    again = paired_bootstrap(["exact_match"], base, tuned, references, resamples=500, seed=1)["exact_match"]
    assert (again.low, again.high) == (result["exact_match"].low, result["exact_match"].high)  # seeded


def test_the_bootstrap_of_a_mean_metric_resamples_its_example_scores_as_recomputing_would():
    """exact_match, token_f1 and rouge_l are means over examples: resampling each example's score once gives the
    interval that recomputing the metric on every resample gives (bleu, chrf and custom metrics are recomputed)."""
    import numpy as np

    rng = np.random.default_rng(3)
    words = ["the cat sat", "a dog ran far", "blue sky", "red car fast", "cat", "sat on the mat"]
    references = [words[i] for i in rng.integers(0, len(words), 30)]
    base = [words[i] for i in rng.integers(0, len(words), 30)]
    kept, others = rng.random(30) < 0.5, rng.integers(0, len(words), 30)
    tuned = [r if keep else words[i] for r, keep, i in zip(references, kept, others, strict=True)]
    fast = paired_bootstrap(["exact_match", "token_f1", "rouge_l", "chrf"], base, tuned, references, resamples=300)
    rng = np.random.default_rng(0)  # the same resamples, each metric recomputed on each
    picks = [rng.integers(0, 30, 30) for _ in range(300)]
    for name in ("exact_match", "token_f1", "rouge_l"):
        gains = [compute([name], [tuned[i] for i in p], [references[i] for i in p])[name]
                 - compute([name], [base[i] for i in p], [references[i] for i in p])[name] for p in picks]
        assert fast[name].low == pytest.approx(np.percentile(gains, 2.5))
        assert fast[name].high == pytest.approx(np.percentile(gains, 97.5))
    assert fast["chrf"].resamples == 300 and fast["chrf"].low <= fast["chrf"].difference <= fast["chrf"].high


def test_search_metric_may_be_a_task_metric_with_its_direction(raw_config, write_config):
    from lora_sweep.config import load_config

    raw_config["search"].update(metric="rouge_l", mode="max")
    raw_config["evaluation"] = {"metrics": ["rouge_l"]}
    config = load_config(write_config(raw_config))
    assert config.generated_val_examples == 32  # unset: trials generate, since only generation gives rouge_l
    raw_config["search"]["mode"] = "min"
    with pytest.raises(ConfigError, match="`search.mode`: rouge_l is higher for better answers"):
        load_config(write_config(raw_config))
    raw_config["search"]["mode"] = "max"
    raw_config["evaluation"]["val_examples"] = 0
    with pytest.raises(ConfigError, match="`evaluation.val_examples`: 0 generates nothing in trials"):
        load_config(write_config(raw_config))
    raw_config["evaluation"] = {"metrics": ["exact_match"]}  # rouge_l is not among the metrics
    with pytest.raises(ConfigError, match=r"`search.metric`: 'rouge_l' is a task metric, reported only when "
                       r"evaluation.metrics lists it \(it lists exact_match\); add rouge_l there"):
        load_config(write_config(raw_config))


def test_a_custom_metrics_name_is_checked_once_it_is_imported(raw_config, write_config, tmp_path, custom_module):
    def change(raw, _):
        raw["search"].update(metric="accuracy", mode="max")
        raw["evaluation"] = {"metrics": ["my_metrics:length_ratio"]}

    refused_case("run", change, "`search.metric`: 'accuracy' is neither a loss the trainable reports",
                 raw_config, write_config, tmp_path)


@pytest.mark.parametrize("every, generated", [(1, [1, 2, 3, 4]), (2, [1, 1, 3, 3])])
def test_trials_generate_at_their_evaluations_and_report_the_task_metrics(raw_config, write_config, tmp_path,
                                                                         monkeypatch, every, generated):
    from lora_sweep.config import load_config
    from lora_sweep.data import prepare_data
    from lora_sweep.models import load_tokenizer
    from lora_sweep.recipe import ListReporter, run_trial
    from lora_sweep.trainables import lora_causal_lm

    raw_config["training"].update(max_steps=8, eval_steps=2)
    raw_config["search"].update(metric="token_f1", mode="max")
    raw_config["evaluation"] = {"metrics": ["token_f1", "exact_match"], "val_examples": 3, "generate_every": every}
    config = load_config(write_config(raw_config))
    data = prepare_data(config.data, load_tokenizer(config), config.seed, tmp_path / "data")
    calls = []
    real = lora_causal_lm.greedy_completions

    def counted(model, tokenizer, prompts, max_new_tokens, batch_size):
        calls.append(len(prompts))
        assert not model.training  # generation runs in eval mode, and training resumes in train mode
        return real(model, tokenizer, prompts, max_new_tokens, batch_size)

    monkeypatch.setattr(lora_causal_lm, "greedy_completions", counted)
    reporter = ListReporter()
    run_trial({}, config.model_dump(), str(data.path), reporter)
    assert [r["step"] for r in reporter.reports] == [2, 4, 6, 8]
    assert calls == [3] * len(set(generated))  # 3 validation answers at each generating evaluation
    for report in reporter.reports:
        assert 0.0 <= report["token_f1"] <= 1.0 and report["exact_match"] in {0.0, 1 / 3, 2 / 3, 1.0}
