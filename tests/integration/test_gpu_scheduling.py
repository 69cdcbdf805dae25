"""GPU scheduling on a machine without GPUs: Ray is told of GPUs that do not exist, trials ask for parts of them.

Ray schedules by the declared GPUs exactly as on a real machine: the test watches how much of
them Ray has handed out. The trainable, finding no CUDA device, trains on its CPU share.
(How many trials *train* at the same moment also depends on how fast worker processes start:
Ray starts at most as many at once as there are CPUs, so on 2 cores not all 8 are up together.)
"""

import threading

import pandas as pd
import pytest
import ray

from lora_sweep.config import load_config
from lora_sweep.pipeline import run
from lora_sweep.report import trial_histories

pytestmark = pytest.mark.integration


class ResourceWatcher(threading.Thread):
    """Polls Ray's free CPUs and GPUs while the sweep runs: the least left free is what the trials were given."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.least = {"CPU": float("inf"), "GPU": float("inf")}

    def run(self):
        while not self.stop.is_set():
            if ray.is_initialized():
                try:
                    free = ray.available_resources()
                except Exception:  # Ray starting or stopping
                    free = None
                if free is not None and "CPU" in ray.cluster_resources():
                    for name in self.least:
                        self.least[name] = min(self.least[name], free.get(name, 0.0))
            self.stop.wait(0.05)


def devices_used(sweep_dir) -> set[str]:
    """The device each report says its trial trained on, from Tune's per-trial results."""
    return {device for history in trial_histories(sweep_dir).values() for device in history["device"]}


def sweep_with_declared_gpus(raw_config, write_config, num_trials, max_concurrent=None):
    raw_config["training"].update({"max_steps": 60, "eval_steps": 30})
    raw_config["search"] = {"space": "lr_only", "num_trials": num_trials}
    if max_concurrent:
        raw_config["search"]["max_concurrent_trials"] = max_concurrent
    raw_config["scheduler"] = {"type": "none"}
    raw_config["resources"] = {"cpu": 0.25, "gpu": 0.5}
    raw_config["ray"] = {"num_cpus": 2, "num_gpus": 4}
    watcher = ResourceWatcher()
    watcher.start()
    try:
        outcome = run(load_config(write_config(raw_config)))
    finally:
        watcher.stop.set()
        watcher.join()
        ray.shutdown()
    return outcome, watcher.least


def test_half_a_gpu_each_on_4_declared_gpus_gives_8_trials_at_once_training_on_the_cpu(raw_config, write_config):
    outcome, least_free = sweep_with_declared_gpus(raw_config, write_config, num_trials=8)
    # All 4 GPUs and both CPUs handed out at once: 8 trials of 0.5 GPU and 0.25 CPU.
    assert least_free == {"CPU": 0.0, "GPU": 0.0}
    board = pd.read_csv(outcome.sweep_dir / "leaderboard.csv")
    assert len(board) == 8 and (board["status"] == "completed").all()
    assert devices_used(outcome.sweep_dir) == {"cpu"}  # no CUDA here: every trial fell back to the CPU
    # device-seconds count the half GPU each trial held
    assert board["device_seconds"].tolist() == pytest.approx((board["wall_seconds"] * 0.5).tolist(), abs=0.01)


def test_a_concurrency_limit_holds_even_when_more_would_fit(raw_config, write_config):
    _, least_free = sweep_with_declared_gpus(raw_config, write_config, num_trials=4, max_concurrent=3)
    assert least_free == {"CPU": 2 - 3 * 0.25, "GPU": 4 - 3 * 0.5}  # never more than 3 trials' worth handed out
