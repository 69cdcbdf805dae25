"""Data-parallel trials (`resources.workers`): a trial of two Ray Train workers (DDP over gloo on the CPU) trains as a
one-worker trial of the same global batch does, spans the nodes of a cluster, and goes on from its checkpoint when a
worker's node is lost."""

import json
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from lora_sweep.config import load_config
from lora_sweep.pipeline import run
from sweep_process import assert_never_started_over

pytestmark = pytest.mark.integration


def _reports(sweep_dir) -> list[dict]:
    (result_file,) = sweep_dir.glob("tune/*/result.json")
    return [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]


def test_two_workers_train_as_one_worker_with_the_same_global_batch(raw_config, write_config, tmp_path):
    """Same seed, same learning rate (Optuna's first draw), same examples in each optimizer step: one worker with
    batch 4 against two workers with batch 2 each. Evaluated one example per batch, so the eval loss is the mean
    over examples however the validation set is split between workers."""
    raw_config["training"].update({"max_steps": 9, "eval_steps": 3, "eval_batch_size": 1})
    raw_config["search"].update({"num_trials": 1, "max_concurrent_trials": 1})
    raw_config["scheduler"] = {"type": "none"}
    runs = {}
    for workers, batch in ((1, 4), (2, 2)):
        raw_config["name"] = f"workers-{workers}"
        raw_config["resources"] = {"cpu": 1, "workers": workers}
        raw_config["training"]["batch_size"] = batch
        config = load_config(write_config(raw_config, f"workers-{workers}.yaml"))
        outcome = run(config)
        ray.shutdown()
        assert outcome.records[0].status == "completed"
        runs[workers] = _reports(config.sweep_dir)
        assert (config.sweep_dir / "export" / "merged" / "model.safetensors").is_file()
    one, two = runs[1], runs[2]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [3, 6, 9]
    assert [r["tokens_seen"] for r in one] == [r["tokens_seen"] for r in two]  # the same examples, counted over workers
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4), (a, b)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-4), (a, b)
    assert all(len(r["worker_node_ids"].split(",")) == 2 for r in two)
    # Both workers' RNG states are in the trial's checkpoints (Train merges each rank's part), for an exact resume.
    (result_file,) = (tmp_path / "results" / "workers-2" / "tune").glob("*/result.json")
    trial_dir = result_file.parent
    kept = sorted(trial_dir.glob("checkpoint_*"))
    assert kept and {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "optimizer.pt"} <= {
        p.name for p in kept[-1].iterdir()}
    # The budget counts every worker: two CPUs held for the trial's wall time.
    record = json.loads((tmp_path / "results" / "workers-2" / "best.json").read_text())
    assert record["device_seconds"] == pytest.approx(2 * record["wall_seconds"], rel=0.01)


def test_a_two_worker_trial_spans_two_nodes_and_goes_on_when_one_is_lost(raw_config, write_config):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs the driver only
    first = cluster.add_node(num_cpus=1)
    second = cluster.add_node(num_cpus=1)
    try:
        raw_config["training"].update({"max_steps": 600, "eval_steps": 30})
        raw_config["search"].update({"num_trials": 1, "max_concurrent_trials": 1})
        raw_config["scheduler"] = {"type": "none"}
        raw_config["failure_retries"] = 2
        raw_config["resources"] = {"cpu": 1, "workers": 2}  # no node holds both workers
        raw_config["ray"] = {"address": cluster.address}
        config = load_config(write_config(raw_config))
        outcome, errors = [], []

        def drive():  # the test plays the failing cluster (Ray's node tools need the main thread)
            try:
                outcome.append(run(config))
            except Exception as error:
                errors.append(error)

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        deadline = time.monotonic() + 180
        while len(list(config.sweep_dir.glob("tune/*/checkpoint_*"))) < 2:
            assert time.monotonic() < deadline and driver.is_alive(), errors
            time.sleep(0.05)
        third = cluster.add_node(num_cpus=1)  # somewhere to go
        cluster.remove_node(second, allow_graceful=False)
        driver.join(timeout=400)
        assert not errors and outcome, errors
        assert outcome[0].records[0].status == "completed"
        reports = _reports(config.sweep_dir)
        steps = [r["step"] for r in reports]
        assert steps[-1] == 600
        assert_never_started_over(steps, 30)  # went on from a checkpoint
        spreads = [set(r["worker_node_ids"].split(",")) for r in reports]
        assert spreads[0] == {first.node_id, second.node_id}  # one worker on each node
        assert spreads[-1] == {first.node_id, third.node_id}  # the lost node's worker started again on the new one
    finally:
        ray.shutdown()
        cluster.shutdown()
