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


def test_rank_zero_takes_the_answer_to_its_own_report_and_skips_one_to_a_lost_worker_group():
    # A worker group lost after its report at step 6 never read Tune's answer; the new group reports step 6 again.
    reporter = WorkerReporter(_Answers((6, GO_ON), (3, STOP), (6, STOP)))
    assert reporter._answer_to(6) == GO_ON
    assert reporter._answer_to(6) == STOP  # the answer to step 3 was stale


def test_outside_a_data_parallel_trial_work_runs_here_once():
    calls = []
    assert world() == (0, 1)
    assert from_rank_zero(lambda: calls.append(1) or {"rouge_l": 0.5}) == {"rouge_l": 0.5}
    assert calls == [1]


@pytest.mark.parametrize(("resources", "held", "fits"), [
    ({"cpu": 1}, 1.0, 8),
    ({"cpu": 1, "workers": 2}, 2.0, 4),
    ({"cpu": 2, "workers": 3}, 6.0, 1),
    ({"cpu": 1, "gpu": 1, "workers": 2}, 2.0, 1),  # 3 GPUs hold one trial of two 1-GPU workers
])
def test_a_trial_holds_every_workers_share(resources, held, fits, raw_config):
    raw_config["search"] = {"space": "lr_only", "num_trials": 10}
    config = SweepConfig.model_validate({**raw_config, "resources": resources})
    assert config.devices_per_trial == held
    assert trials_that_fit(config, cpus=8, gpus=3) == fits
    assert reuses_trial_actors(config) == (config.resources.workers == 1)
