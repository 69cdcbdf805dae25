"""The per-trial tracker every driver callback derives from, and TensorBoard's callback on it, from Tune's events."""

from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lora_sweep.tensorboard_logs import TensorBoardCallback
from lora_sweep.tracking import TrialProgress, TrialTracker


def trial(trial_id: str, lr: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"training.learning_rate": lr})


class Recorder(TrialTracker):
    """A tracker that writes down what each hook saw, as a new tracker (MLflow, W&B) would read it."""

    def __init__(self, mode: str = "min"):
        super().__init__("eval_loss", mode, max_steps=100)
        self.seen: list[tuple] = []

    def log_trial_start(self, trial):
        self.seen.append(("start", trial.trial_id, self.trials[trial.trial_id].status))

    def log_trial_result(self, iteration, trial, result):
        progress = self.trials[trial.trial_id]
        self.seen.append(("result", trial.trial_id, progress.step, progress.best_metric))

    def log_trial_end(self, trial, failed=False):
        self.seen.append(("end", trial.trial_id, self.trials[trial.trial_id].status, failed))


def test_hooks_see_the_record_after_each_event():
    tracker, a = Recorder(), trial("a", 1e-3)
    tracker.on_trial_start(0, [], a)
    tracker.on_trial_result(0, [], a, {"step": 50, "eval_loss": 2.5})
    tracker.on_trial_result(0, [], a, {"step": 100, "eval_loss": 2.7})  # worse: the best stays 2.5
    tracker.on_trial_complete(0, [], a)
    assert tracker.seen == [("start", "a", "running"), ("result", "a", 50, 2.5), ("result", "a", 100, 2.5),
                            ("end", "a", "completed", False)]
    record = tracker.trials["a"]
    assert (record.best_metric, record.best_step, record.last_metric) == (2.5, 50, 2.7)
    assert record.started_at is not None and record.ended_at >= record.started_at


@pytest.mark.parametrize("mode, values, best", [("min", [3.0, 2.0, 2.5], 2.0), ("max", [0.2, 0.5, 0.4], 0.5)])
def test_best_follows_the_direction(mode, values, best):
    tracker, a = Recorder(mode), trial("a", 1e-3)
    for step, value in enumerate(values, 1):
        tracker.on_trial_result(0, [], a, {"step": step, "eval_loss": value})
    assert tracker.trials["a"].best_metric == best


def test_a_diverged_report_never_becomes_the_best_and_ends_the_trial_errored():
    tracker, a, b = Recorder(), trial("a", 1e-3), trial("b", 1e-2)
    tracker.on_trial_result(0, [], a, {"step": 10, "eval_loss": 3.0})
    tracker.on_trial_result(0, [], a, {"step": 20, "eval_loss": -1e9, "diverged": True})  # "better", but diverged
    tracker.on_trial_result(0, [], a, {"step": 30, "eval_loss": float("nan")})
    tracker.on_trial_complete(0, [], a)
    tracker.on_trial_result(0, [], b, {"step": 40})  # no metric in the report
    tracker.on_trial_complete(0, [], b)
    tracker.on_trial_error(0, [], trial("c", 1e-4))  # an error before any report
    assert tracker.trials["a"].best_metric == 3.0 and tracker.trials["a"].diverged
    assert [tracker.trials[t].status for t in "abc"] == ["errored", "stopped early", "errored"]
    assert tracker.trials["b"].best_metric is None and tracker.trials["b"].step == 40
    assert tracker.seen[-1] == ("end", "c", "errored", True)
    assert tracker.trials["c"] == TrialProgress("c", "errored", {"training.learning_rate": 1e-4},
                                                ended_at=tracker.trials["c"].ended_at)


def test_tensorboard_writes_scalars_and_the_hparams_session_from_the_record(tmp_path):
    callback, a, b = TensorBoardCallback(tmp_path, "eval_loss", "min", max_steps=20), trial("a", 1e-3), trial("b", 1e-2)
    for step, loss in ((10, 2.0), (20, 2.2)):
        callback.on_trial_result(0, [], a, {"step": step, "eval_loss": loss, "train_loss": loss + 1,
                                            "adapter_params": 512})
    callback.on_trial_complete(0, [], a)
    callback.on_trial_result(0, [], b, {"step": 10, "eval_loss": 5.0})
    callback.on_trial_error(0, [], b)

    runs = {path.name: path for path in tmp_path.iterdir()}
    assert set(runs) == {"a_lr=0.001", "b_lr=0.01"}
    expected = {"a_lr=0.001": ("completed", 2.0, 20, 512), "b_lr=0.01": ("errored", 5.0, 10, None)}
    for name, (status, best, steps, adapter_params) in expected.items():
        events = EventAccumulator(str(runs[name])).Reload()
        assert events.Scalars("hparam/best_eval_loss")[-1].value == pytest.approx(best)
        assert events.Scalars("hparam/steps_run")[-1].value == steps
        if adapter_params is not None:
            assert events.Scalars("hparam/adapter_params")[-1].value == adapter_params
        start = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["status"].string_value == status
    events = EventAccumulator(str(runs["a_lr=0.001"])).Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval_loss")] == [(10, 2.0), (20, pytest.approx(2.2))]
    assert [e.step for e in events.Scalars("train_loss")] == [10, 20]
