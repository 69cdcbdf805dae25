"""The pieces of a data-parallel trial that need no Ray Train workers: Tune's answers to rank 0, work done once on
rank 0, and what a trial of several workers holds."""

import queue

import pytest

from lora_sweep.config import SweepConfig
from lora_sweep.distributed import GO_ON, STOP, WorkerReporter, from_rank_zero, world
from lora_sweep.driver import reuses_trial_actors, trials_that_fit


class _Answers:
    """ray.util.queue.Queue's get(timeout=...), on a local queue."""

    def __init__(self, *answers):
        self.queue = queue.Queue()
        for answer in answers:
            self.queue.put(answer)

    def get(self, timeout=None):
        return self.queue.get(timeout=timeout)


def test_rank_zero_skips_a_go_on_meant_for_a_lost_worker_group_and_takes_any_stop():
    # A worker group lost after its report at step 3 never read Tune's go-on; the new group, started from the
    # checkpoint of step 3, reports step 6 next.
    reporter = WorkerReporter(_Answers((3, GO_ON), (6, GO_ON)))
    assert reporter._answer_to(6) == GO_ON and reporter.answers.queue.empty()
    # Tune stopped the trial at step 6 while a new group (started from an older checkpoint) reports step 3: it stops.
    assert WorkerReporter(_Answers((6, STOP)))._answer_to(3) == STOP


def test_promotion_asha_starts_no_more_data_parallel_trials_than_fit():
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from lora_sweep.schedulers import PromotionASHA

    trials = [SimpleNamespace(trial_id="a", status=Trial.RUNNING), SimpleNamespace(trial_id="b", status=Trial.PENDING)]
    controller = SimpleNamespace(get_trials=lambda: trials)
    limited = PromotionASHA(time_attr="step", max_t=9, grace_period=3, reduction_factor=3, max_running=1)
    assert limited.choose_trial_to_run(controller) is None
    unlimited = PromotionASHA(time_attr="step", max_t=9, grace_period=3, reduction_factor=3)
    assert unlimited.choose_trial_to_run(controller) is trials[1]


def test_outside_a_data_parallel_trial_work_runs_here_once():
    calls = []
    assert world() == (0, 1)
    assert from_rank_zero(lambda: calls.append(1) or {"rouge_l": 0.5}) == {"rouge_l": 0.5}
    assert calls == [1]


@pytest.mark.parametrize(("resources", "limit", "held", "fits"), [
    ({"cpu": 1}, None, 1.0, 8),
    ({"cpu": 1}, 9, 1.0, 9),  # Tune's own accounting holds back the trials that do not fit
    ({"cpu": 1, "workers": 2}, None, 2.0, 4),
    ({"cpu": 1, "workers": 2}, 9, 2.0, 4),  # Tune would not: what fits caps the limit
    ({"cpu": 2, "workers": 3}, None, 6.0, 1),
    ({"cpu": 1, "gpu": 1, "workers": 2}, None, 2.0, 1),  # 3 GPUs hold one trial of two 1-GPU workers
])
def test_a_trial_holds_every_workers_share(resources, limit, held, fits, raw_config):
    raw_config["search"] = {"space": "lr_only", "num_trials": 10, "max_concurrent_trials": limit}
    config = SweepConfig.model_validate({**raw_config, "resources": resources})
    assert config.devices_per_trial == held
    assert trials_that_fit(config, cpus=8, gpus=3) == fits
    assert reuses_trial_actors(config) == (config.resources.workers == 1)
