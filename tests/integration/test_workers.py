"""Data-parallel trials (`resources.workers`): a trial of two Ray Train workers (DDP over gloo on the CPU) trains as a
one-worker trial of the same global batch does, spans the nodes of a cluster, and goes on from its checkpoint when a
worker's node is lost."""

import json
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from lora_sweep.config import load_config
from lora_sweep.pipeline import run
from sweep_process import assert_never_started_over, drive_in_a_thread

pytestmark = pytest.mark.integration


def _reports(sweep_dir) -> dict[float, list[dict]]:
    """Each trial's reports, by its learning rate."""
    reports = {}
    for result_file in sweep_dir.glob("tune/*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        reports[rows[0]["config"]["training.learning_rate"]] = rows
    return reports


def test_two_workers_train_as_one_worker_with_the_same_global_batch(raw_config, write_config, tmp_path):
    """Same seed, same learning rate (Optuna's first draw), the same examples in each optimizer step: one worker with
    batch 4 against two workers with batch 2 each. Evaluated one example per batch, so the eval loss is the mean over
    the same examples however the validation set is split between workers. The two-worker sweep runs three trials
    under promotion ASHA: trials pause at a rung (their workers stop), one resumes from its checkpoint to the end,
    the others are stopped early, and the best is promoted and exported."""
    raw_config["training"].update({"max_steps": 9, "eval_steps": 3, "eval_batch_size": 1})
    raw_config["search"].update({"max_concurrent_trials": 1})
    runs = {}
    for workers, batch, trials, scheduler in ((1, 4, 1, {"type": "none"}),
                                              (2, 2, 3, {"type": "promotion_asha", "grace_period": 3})):
        raw_config["name"] = f"workers-{workers}"
        raw_config["resources"] = {"cpu": 1, "workers": workers}
        raw_config["training"]["batch_size"] = batch
        raw_config["search"]["num_trials"] = trials
        raw_config["scheduler"] = scheduler
        config = load_config(write_config(raw_config, f"workers-{workers}.yaml"))
        outcome = run(config)
        ray.shutdown()
        runs[workers] = (outcome, _reports(config.sweep_dir))
        assert (config.sweep_dir / "export" / "merged" / "model.safetensors").is_file()
    (one,) = runs[1][1].values()
    two = runs[2][1][one[0]["config"]["training.learning_rate"]]  # the two-worker sweep's first trial
    assert [r["step"] for r in one] == [3, 6, 9] and len(two) >= 1
    for a, b in zip(one, two, strict=False):  # up to where promotion ASHA let the two-worker trial go
        assert b["step"] == a["step"] and b["tokens_seen"] == a["tokens_seen"]  # the same examples, over workers
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4), (a, b)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-4), (a, b)
    records = runs[2][0].records
    assert sorted(r.status for r in records) == ["completed", "stopped early", "stopped early"]
    best = next(r for r in records if r.status == "completed")
    assert best.steps_run == 9 and best.best_checkpoint
    # A paused trial resumed from its checkpoint: its steps never start over.
    (resumed,) = [rows for rows in runs[2][1].values() if rows[-1]["step"] == 9]
    assert [r["step"] for r in resumed] == [3, 6, 9]
    assert all(len(r["worker_node_ids"].split(",")) == 2 for rows in runs[2][1].values() for r in rows)
    # Both workers' RNG states are in the trial's checkpoints (Train merges each rank's part), for an exact resume.
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "optimizer.pt"} <= {
        p.name for p in Path(best.best_checkpoint).iterdir()}
    # Ray Train's runs are gone with the sweep; Tune holds the checkpoints.
    assert not (tmp_path / "results" / "workers-2" / "workers").exists()


def test_a_two_worker_trial_spans_two_nodes_and_goes_on_when_one_is_lost(raw_config, write_config):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs the driver only
    first = cluster.add_node(num_cpus=1)
    second = cluster.add_node(num_cpus=1)
    try:
        raw_config["training"].update({"max_steps": 300, "eval_steps": 30})
        raw_config["search"].update({"num_trials": 1, "max_concurrent_trials": 1})
        raw_config["scheduler"] = {"type": "none"}
        raw_config["failure_retries"] = 2
        raw_config["resources"] = {"cpu": 1, "workers": 2}  # no node holds both workers
        raw_config["ray"] = {"address": cluster.address}
        config = load_config(write_config(raw_config))
        driver, outcome, errors = drive_in_a_thread(config, timeout=180)
        third = cluster.add_node(num_cpus=1)  # somewhere to go
        cluster.remove_node(second, allow_graceful=False)
        driver.join(timeout=400)
        assert not errors and outcome, errors
        assert outcome[0].records[0].status == "completed"
        (reports,) = _reports(config.sweep_dir).values()
        steps = [r["step"] for r in reports]
        assert steps[-1] == 300
        assert_never_started_over(steps, 30)  # went on from a checkpoint
        spreads = [set(r["worker_node_ids"].split(",")) for r in reports]
        assert spreads[0] == {first.node_id, second.node_id}  # one worker on each node
        assert spreads[-1] == {first.node_id, third.node_id}  # the lost node's worker started again on the new one
        # by Ray Train, within the trial: Tune saw no failure of it
        assert not list(config.sweep_dir.glob("tune/*/error.txt"))
    finally:
        ray.shutdown()
        cluster.shutdown()
