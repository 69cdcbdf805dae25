"""A sweep whose objective is a task metric of generated answers: multi-turn `messages` data, search.metric
rouge_l (max), ASHA stopping on it, the best promoted, exported, and its test answers scored against the base."""

import json
import math
import random

from pathlib import Path

import pandas as pd
import pytest
import ray
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_sweep.config import load_config
from lora_sweep.pipeline import run

pytestmark = pytest.mark.integration


DEMO_MODEL = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama"
def conversations(count: int, seed: int) -> list[dict]:
    """Two questions about one word each, the assistant answering in a set phrase with the word: the demo
    model picks the phrase up in a few steps at a good learning rate and not at a tiny one, so ROUGE-L tells
    the trials apart."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 5)))
        rows.append({"messages": [{"role": "user", "content": f"Note the word {word}."},
                                  {"role": "assistant", "content": f"it is noted as {word}"},
                                  {"role": "user", "content": "Again?"},
                                  {"role": "assistant", "content": f"it is noted as {word}"}]})
    return rows


def test_a_sweep_on_conversations_searches_rouge_l_and_promotes_its_best(raw_config, write_config, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in conversations(160, seed=3)))
    raw_config["model"]["path"] = str(DEMO_MODEL)
    # The default template turn by turn: the format the demo model was pretrained on (its chat template is not).
    raw_config["data"] = {"files": [str(data)], "max_length": 192, "template": "default"}
    raw_config["training"].update({"max_steps": 16, "eval_steps": 4})
    raw_config["search"] = {"space": None, "num_trials": 6, "max_concurrent_trials": 1, "metric": "rouge_l",
                            "mode": "max", "sampler": "random", "parameters": {
                                "training.learning_rate": {"type": "choice", "values": [1e-6, 1e-5, 2e-2]}}}
    # One trial at a time: each is compared at step 8 with those before it, in the sampler's (seeded) order.
    raw_config["scheduler"] = {"type": "asha", "grace_period": 8, "reduction_factor": 2}
    raw_config["evaluation"] = {"metrics": ["rouge_l", "exact_match"], "val_examples": 8, "max_new_tokens": 8}
    config = load_config(write_config(raw_config))
    try:
        outcome = run(config)
    finally:
        ray.shutdown()
    sweep_dir = outcome.sweep_dir

    # Every evaluation of every trial reported rouge_l and exact_match of its 8 generated answers.
    results = sorted((sweep_dir / "tune").glob("*/result.json"))
    assert len(results) == 6
    for result_file in results:
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        assert rows and all(0.0 <= row["rouge_l"] <= 1.0 and row["exact_match"] in {i / 8 for i in range(9)}
                            for row in rows)
    assert len({row["rouge_l"] for f in results for row in map(json.loads, f.read_text().splitlines())}) > 1
    # ASHA compared trials on rouge_l and stopped some; promotion took the highest.
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert "best_rouge_l" in board.columns and board["best_rouge_l"].notna().all()
    assert "stopped early" in set(board["status"])
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["best_metric"] == pytest.approx(board["best_rouge_l"].max())
    assert board.iloc[0]["trial_id"] == best["trial_id"]  # sorted best first: highest first for max

    final = json.loads((sweep_dir / "final_metrics.json").read_text())
    assert set(final["task_metrics"]) == {"rouge_l", "exact_match"}
    rouge = final["task_metrics"]["rouge_l"]
    assert rouge["low"] <= rouge["difference"] <= rouge["high"] and math.isfinite(rouge["tuned"])
    assert (sweep_dir / "export" / "merged" / "model.safetensors").is_file()
    assert "| rouge_l |" in (sweep_dir / "export" / "README.md").read_text()
    provenance = json.loads((sweep_dir / "provenance.json").read_text())
    assert (provenance["data_format"], provenance["template"]) == ("messages", "default")

    # TensorBoard carries the task metrics beside the losses.
    run_dir = next(p for p in (sweep_dir / "tensorboard").iterdir() if p.name.startswith(best["trial_id"]))
    assert {"rouge_l", "exact_match", "eval_loss"} <= set(EventAccumulator(str(run_dir)).Reload().Tags()["scalars"])
