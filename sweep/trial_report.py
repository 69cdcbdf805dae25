"""What a trial reports at every evaluation: one typed record, and its keys named once.

As Ray Tune's `tune/result.py` does for its own keys: the trainable builds a `TrialReport`, Tune stores it
as a flat dict (result.json), and everything that reads results back (records, progress, TensorBoard, the
searcher and the schedulers) names a key through the constants here, never through a string of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

# Keys of a trial's report, as Tune records them.
STEP = "step"  # the optimizer step of the evaluation: the schedulers' time axis
EVAL_LOSS = "eval_loss"
EVAL_PERPLEXITY = "eval_perplexity"
TRAIN_LOSS = "train_loss"  # the last logged training loss
LEARNING_RATE = "learning_rate"
TOKENS_PER_SECOND = "tokens_per_second"  # training tokens (not padding) per training second since the last report
TOKENS_SEEN = "tokens_seen"
TRAIN_SECONDS = "train_seconds"  # optimizer steps only: no start-up, evaluation or checkpoints
STARTUP_SECONDS = "startup_seconds"
DIVERGED = "diverged"
DIVERGED_REASON = "diverged_reason"  # only in a report of a diverged trial
DEVICE = "device"  # where the trial trained: the GPU Ray assigned, or the CPU
ADAPTER_PARAMS = "adapter_params"
EVAL_MS_PER_EXAMPLE = "eval_ms_per_example"
NODE_ID = "node_id"  # added by the Tune reporter: the Ray node that ran the trial (rank 0's, with workers)
WORKER_NODE_IDS = "worker_node_ids"  # a data-parallel trial's: every worker's Ray node, comma-separated, by rank

# What `search.metric` may name (and any metric of `evaluation.metrics`, a custom one's included), and the costs
# `search.also_minimize` may name.
OBJECTIVE_METRICS = (EVAL_LOSS, EVAL_PERPLEXITY, TRAIN_LOSS)
TASK_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu", "chrf")  # the built-ins (lora_sweep.metrics); higher-better
COST_METRICS = (ADAPTER_PARAMS, EVAL_MS_PER_EXAMPLE)
# Per-trial scalars in TensorBoard, and what a trial record keeps of its best evaluation.
SCALARS = (EVAL_LOSS, EVAL_PERPLEXITY, TRAIN_LOSS, LEARNING_RATE, TOKENS_PER_SECOND, EVAL_MS_PER_EXAMPLE)
BEST_EVALUATION_KEYS = (STEP, EVAL_LOSS, EVAL_PERPLEXITY, TRAIN_LOSS, LEARNING_RATE, TOKENS_PER_SECOND, *COST_METRICS)


@dataclass(frozen=True)
class TrialReport:
    """One evaluation of one trial. A diverged trial reports the worst value of the sweep metric and why."""

    step: int
    eval_loss: float
    eval_perplexity: float
    train_loss: float
    learning_rate: float
    tokens_per_second: float
    tokens_seen: int
    train_seconds: float
    startup_seconds: float
    diverged: bool
    device: str
    # Costs a multi-objective sweep can minimise (search.also_minimize): the adapter's size, and the
    # evaluation's time per example on this device (with whatever else runs on it at the time).
    adapter_params: int
    eval_ms_per_example: float
    diverged_reason: Optional[str] = None

    def as_dict(self, task_metrics: Optional[dict[str, float]] = None) -> dict[str, Any]:
        """The flat dict Tune stores (without `diverged_reason` unless the trial diverged), with the task metrics
        of the evaluation's generated answers (`evaluation.metrics`, when trials generate) beside the rest."""
        report = dataclasses.asdict(self)
        if self.diverged_reason is None:
            del report[DIVERGED_REASON]
        return {**report, **(task_metrics or {})}

    def diverging(self, metric: str, worst: float, reason: str) -> TrialReport:
        """This report as a diverged trial's: the sweep metric at its worst, so schedulers and samplers rank it last.
        (A task metric as the sweep metric is set to its worst by the caller, in `as_dict`'s task metrics.)"""
        if not hasattr(self, metric):
            return dataclasses.replace(self, diverged=True, diverged_reason=reason)
        worst_metric: dict[str, Any] = {metric: worst}
        return dataclasses.replace(self, diverged=True, diverged_reason=reason, **worst_metric)


# Names a custom task metric may not take: every key of a report, the ones the Tune reporter adds, and Tune's own
# (a metric named `diverged` or `time_total_s` would overwrite what the schedulers and records read).
# Tune's are written out (ray.tune.result's AUTO_RESULT_KEYS, DONE, TRIAL_ID, ...): importing Ray Tune here would
# slow every command that reads a config; a test checks the list against the installed Ray.
TUNE_RESULT_KEYS = ("training_iteration", "time_total_s", "episodes_total", "timesteps_total", "node_ip", "hostname",
                    "pid", "time_this_iter_s", "timestamp", "date", "time_since_restore", "timesteps_since_restore",
                    "iterations_since_restore", "config", "checkpoint_dir_name", "done", "trial_id",
                    "should_checkpoint", "experiment_tag")
RESERVED_KEYS = (*(field.name for field in dataclasses.fields(TrialReport)), NODE_ID, WORKER_NODE_IDS,
                 *TUNE_RESULT_KEYS)
