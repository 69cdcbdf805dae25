"""A sweep on an existing two-node Ray cluster (`sweep run --address`): trials run on both nodes, results land in one folder."""

import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster
from typer.testing import CliRunner

from lora_sweep.cli import app
from lora_sweep.config import load_config
from lora_sweep.report import trial_histories

pytestmark = pytest.mark.integration


def test_trials_run_on_both_nodes_and_all_results_reach_one_sweep_folder(raw_config, write_config):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    try:
        raw_config["training"].update({"max_steps": 6, "eval_steps": 3})
        raw_config["search"].update({"num_trials": 4, "max_concurrent_trials": 2})
        raw_config["scheduler"] = {"type": "none"}
        config_path = write_config(raw_config)
        result = CliRunner().invoke(app, ["run", str(config_path), "--address", cluster.address])
        assert result.exit_code == 0, result.output
        sweep_dir = load_config(config_path).sweep_dir
        nodes = {node for history in trial_histories(sweep_dir).values() for node in history["node_id"]}
        assert nodes == {cluster.head_node.node_id, second.node_id}  # both nodes trained
        board = pd.read_csv(sweep_dir / "leaderboard.csv")
        assert len(board) == 4 and (board["status"] == "completed").all()
        assert len(list((sweep_dir / "tensorboard").iterdir())) == 4
        assert (sweep_dir / "export" / "merged" / "model.safetensors").is_file()
    finally:
        ray.shutdown()
        cluster.shutdown()
