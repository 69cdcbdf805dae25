import dataclasses
import math

from lora_sweep import trial_report as keys
from lora_sweep.trial_report import TrialReport


def a_report(**changes) -> TrialReport:
    values = dict(step=10, eval_loss=2.0, eval_perplexity=math.exp(2.0), train_loss=2.1, learning_rate=1e-3,
                  tokens_per_second=100.0, tokens_seen=1000, train_seconds=1.5, startup_seconds=0.5, diverged=False,
                  device="cpu", adapter_params=64, eval_ms_per_example=3.0)
    return TrialReport(**{**values, **changes})


def test_every_field_of_the_report_is_a_named_key_and_the_key_lists_name_fields():
    named = {value for name, value in vars(keys).items() if name.isupper() and isinstance(value, str)}
    fields = {field.name for field in dataclasses.fields(TrialReport)}
    # NODE_ID is added by the Tune reporter (and a data-parallel trial's WORKER_NODE_IDS by its workers' reporter),
    # not by the trainable
    assert fields == named - {keys.NODE_ID, keys.WORKER_NODE_IDS}
    for listed in (keys.OBJECTIVE_METRICS, keys.COST_METRICS, keys.SCALARS, keys.BEST_EVALUATION_KEYS):
        assert set(listed) <= fields


def test_a_report_as_tune_stores_it():
    report = a_report().as_dict()
    assert keys.DIVERGED_REASON not in report and report[keys.STEP] == 10 and report[keys.EVAL_LOSS] == 2.0
    diverged = a_report().diverging(keys.EVAL_LOSS, math.inf, "eval loss became nan at step 10").as_dict()
    assert diverged[keys.EVAL_LOSS] == math.inf and diverged[keys.DIVERGED] is True
    assert diverged[keys.DIVERGED_REASON] == "eval loss became nan at step 10"
    assert list(report) == [field.name for field in dataclasses.fields(TrialReport)][:-1]  # Tune's column order


def test_the_reserved_names_cover_tunes_own_result_keys():
    from ray.tune import result

    from lora_sweep.trial_report import RESERVED_KEYS

    tune_keys = {*result.AUTO_RESULT_KEYS, result.DONE, result.TRIAL_ID, result.SHOULD_CHECKPOINT, result.EXPERIMENT_TAG}
    assert tune_keys <= set(RESERVED_KEYS)
    assert {"diverged", "tokens_seen", "train_seconds", "device", "node_id", "eval_loss"} <= set(RESERVED_KEYS)
