import math

import torch

import pytest

from lora_sweep.config import load_config
from lora_sweep.data import prepare_data
from lora_sweep.models import load_tokenizer
from lora_sweep.recipe import ListReporter, run_trial


@pytest.fixture
def prepared(raw_config, write_config, tmp_path):
    config = load_config(write_config(raw_config))
    data = prepare_data(config.data, load_tokenizer(config), config.seed, tmp_path / "data")
    return config, data.path


def test_a_trial_reports_every_evaluation_with_an_adapter_only_checkpoint(prepared, peft_trainable_parameters):
    config, data_path = prepared
    reporter = ListReporter()
    outcome = run_trial({"training.learning_rate": 1e-3}, config.model_dump(), str(data_path), reporter)
    assert outcome.steps == 6 and outcome.diverged_reason is None
    assert [r["step"] for r in reporter.reports] == [3, 6]
    for report in reporter.reports:
        assert math.isfinite(report["eval_loss"]) and math.isfinite(report["train_loss"])
        assert report["eval_perplexity"] == pytest.approx(math.exp(report["eval_loss"]))
        assert report["tokens_per_second"] > 0 and report["learning_rate"] > 0
    assert reporter.reports[-1]["tokens_seen"] > reporter.reports[0]["tokens_seen"]
    for files in reporter.checkpoint_files:
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= set(files)
        assert not any(f.startswith("model") for f in files)  # never a full copy of the model
    assert outcome.best_metric == min(r["eval_loss"] for r in reporter.reports)
    # The costs a two-objective sweep can minimise: peft's trainable parameters, evaluation time per example.
    assert {r["adapter_params"] for r in reporter.reports} == {peft_trainable_parameters(config.model.path, rank=8)}
    assert all(r["eval_ms_per_example"] > 0 for r in reporter.reports)


def test_the_same_params_and_seed_give_the_same_losses(prepared):
    config, data_path = prepared
    losses = []
    for _ in range(2):
        reporter = ListReporter()
        run_trial({"training.learning_rate": 1e-3}, config.model_dump(), str(data_path), reporter)
        losses.append([r["eval_loss"] for r in reporter.reports])
    assert losses[0] == losses[1]


def test_a_diverging_trial_stops_and_says_why(prepared):
    config, data_path = prepared
    reporter = ListReporter()
    params = {"training.learning_rate": 1e30, "training.max_grad_norm": 1e30}
    outcome = run_trial(params, config.model_dump(), str(data_path), reporter)
    assert outcome.diverged_reason is not None and "became" in outcome.diverged_reason
    last = reporter.reports[-1]
    assert last["diverged"] is True and last["eval_loss"] == math.inf
    assert last["diverged_reason"] == outcome.diverged_reason
    assert reporter.checkpoint_files[-1] == []  # no checkpoint of a diverged model


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_a_restarted_trial_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(prepared, tmp_path, init):
    config, data_path = prepared
    params = {"training.learning_rate": 1e-3, "lora.init": init}
    whole = ListReporter(keep_checkpoints_in=tmp_path / "whole")
    run_trial(params, config.model_dump(), str(data_path), whole)

    resumed = ListReporter(resume_from=tmp_path / "whole" / "step-3")
    outcome = run_trial(params, config.model_dump(), str(data_path), resumed)
    assert [r["step"] for r in resumed.reports] == [6]  # steps 1-3 are not trained again
    assert outcome.steps == 6
    assert resumed.reports[0]["eval_loss"] == pytest.approx(whole.reports[-1]["eval_loss"], rel=1e-5)


def test_the_base_model_is_reused_between_trials_and_comes_back_untouched(prepared):
    from lora_sweep import models

    config, data_path = prepared
    models._BASE_MODELS.clear()
    run_trial({"training.learning_rate": 1e-2, "lora.target_modules": "all-linear"}, config.model_dump(), str(data_path), ListReporter())
    (kept,) = models._BASE_MODELS.values()
    fresh = models.load_base_model(config)
    assert not any("lora" in name for name, _ in kept.named_modules())
    kept_weights, fresh_weights = kept.state_dict(), fresh.state_dict()
    assert kept_weights.keys() == fresh_weights.keys()
    assert all(torch.equal(kept_weights[k], fresh_weights[k]) for k in kept_weights)
    assert models.take_base_model(config) is kept  # the next trial gets the same object, no reload


@pytest.mark.parametrize("variant", [
    {"lora.use_dora": True}, {"lora.use_rslora": True}, {"lora.init": "gaussian"}, {"lora.loraplus_lr_ratio": 16.0},
    {"lora.init": "pissa"}, {"lora.init": "olora"}, {"lora.init": "pissa", "lora.target_modules": ["q_proj", "down_proj"]},
])
def test_lora_variants_train_and_leave_the_kept_base_model_untouched(prepared, variant):
    from lora_sweep import models

    config, data_path = prepared
    models._BASE_MODELS.clear()
    reporter = ListReporter()
    run_trial({"training.learning_rate": 1e-2, **variant}, config.model_dump(), str(data_path), reporter)
    assert [r["step"] for r in reporter.reports] == [3, 6] and all(math.isfinite(r["eval_loss"]) for r in reporter.reports)
    (kept,) = models._BASE_MODELS.values()
    fresh = models.load_base_model(config).state_dict()
    assert kept.state_dict().keys() == fresh.keys()
    assert all(torch.equal(value, fresh[name]) for name, value in kept.state_dict().items())


def test_variants_reach_peft_and_loraplus_gives_b_its_own_learning_rate(prepared):
    import peft

    from lora_sweep.lora import lora_settings
    from lora_sweep.search_space import apply_params
    from lora_sweep.models import load_base_model
    from lora_sweep.trainables.lora_causal_lm import loraplus_optimizer

    config, _ = prepared
    config = apply_params(config, {"lora.use_dora": True, "lora.use_rslora": True, "lora.init": "gaussian",
                                   "lora.loraplus_lr_ratio": 16.0, "training.learning_rate": 1e-3})
    base = load_base_model(config)
    settings = lora_settings(config.lora, base)
    assert (settings.use_dora, settings.use_rslora, settings.init_lora_weights) == (True, True, "gaussian")
    model = peft.get_peft_model(base, settings)
    rates = {}
    for group in loraplus_optimizer(config, model).param_groups:
        for parameter in group["params"]:
            rates[id(parameter)] = group["lr"]
    named = dict(model.named_parameters())
    assert {rates[id(p)] for n, p in named.items() if "lora_A" in n} == {1e-3}
    assert sorted({rates[id(p)] for n, p in named.items() if "lora_B" in n}) == pytest.approx([16e-3])
    assert loraplus_optimizer(apply_params(config, {"lora.loraplus_lr_ratio": None}), model) is None


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_train_on_rewritten_base_weights_that_are_put_back(prepared, init):
    from lora_sweep import models

    config, data_path = prepared
    models._BASE_MODELS.clear()
    base = models.load_base_model(config)
    original = base.model.layers[0].self_attn.q_proj.weight.clone()
    models.give_back_base_model(config, base)
    seen = []

    class Watching(ListReporter):
        def report(self, metrics, checkpoint_dir):
            seen.append(base.model.layers[0].self_attn.q_proj.base_layer.weight.clone())
            super().report(metrics, checkpoint_dir)

    run_trial({"training.learning_rate": 1e-2, "lora.init": init}, config.model_dump(), str(data_path), Watching())
    assert seen and not torch.allclose(seen[0], original)  # the trial really trained on W - B0 A0
    assert torch.equal(models.take_base_model(config).model.layers[0].self_attn.q_proj.weight, original)


def test_a_trial_diverging_before_its_first_answers_still_reports_the_task_metric_it_is_ranked_by():
    """search.metric rouge_l, and the loss turns NaN before any generation: the report carries rouge_l at its worst
    (Tune refuses a result without the sweep metric, which would end the whole sweep)."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from lora_sweep.recipe import ListReporter
    from lora_sweep.trainables.lora_causal_lm import EvaluationReporter

    reporter = ListReporter()
    callback = EvaluationReporter(reporter, "rouge_l", "max", trial_started=0.0, adapter_params=10,
                                  scorer=lambda model: {"rouge_l": 0.5})
    state = SimpleNamespace(global_step=2, num_input_tokens_seen=100)
    args = SimpleNamespace(device="cpu")
    control = TrainerControl()
    callback.on_log(args, state, control, logs={"loss": math.nan})
    callback.on_evaluate(args, state, control, metrics={"eval_loss": math.nan}, model=None)
    [report] = reporter.reports
    assert report["diverged"] is True and report["rouge_l"] == -math.inf
