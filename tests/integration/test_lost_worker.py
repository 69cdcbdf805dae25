"""A Ray cluster of local nodes loses the node running a trial; the trial resumes from its checkpoint on another."""

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from lora_sweep.config import load_config
from sweep_process import assert_never_started_over, drive_in_a_thread, trial_histories

pytestmark = pytest.mark.integration


def test_a_trial_on_a_lost_node_resumes_on_another_node(raw_config, write_config):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs only the driver
    first_worker = cluster.add_node(num_cpus=1)
    try:
        raw_config["training"].update({"max_steps": 1500, "eval_steps": 50})
        raw_config["search"].update({"num_trials": 1, "max_concurrent_trials": 1})
        raw_config["scheduler"] = {"type": "none"}
        raw_config["failure_retries"] = 2
        raw_config["ray"] = {"address": cluster.address}
        config = load_config(write_config(raw_config))
        driver, outcome, errors = drive_in_a_thread(config, timeout=120)
        cluster.add_node(num_cpus=1)  # somewhere to go
        cluster.remove_node(first_worker, allow_graceful=False)
        driver.join(timeout=300)
        assert not errors and outcome, errors
        (steps,) = trial_histories(config.sweep_dir).values()
        assert steps[-1] == 1500
        assert_never_started_over(steps, 50)  # went on from a checkpoint
        (result_file,) = config.sweep_dir.glob("tune/*/result.json")
        pids = [json.loads(line)["pid"] for line in result_file.read_text().splitlines() if line.strip()]
        assert len(set(pids)) == 2  # one worker process on each node
        assert outcome[0].records[0].status == "completed"
    finally:
        ray.shutdown()
        cluster.shutdown()
