"""Final evaluation of the promoted checkpoint against the base model, then a verified export.

The export is assembled in a temporary folder, verified by reloading, and only
then renamed to `export/`: a killed or failed export never looks complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from transformers import AutoModelForCausalLM

from lora_sweep.config import REWRITES_BASE_WEIGHTS, PromotionConfig, SweepConfig, config_to_yaml
from lora_sweep.data import load_prepared, prompt_token_ids
from lora_sweep.evaluate import EvalMetrics, evaluate_model, shown_match
from lora_sweep.folder import CONFIRM_FILE, EXPORT_DIR, FINAL_METRICS_FILE, MERGED_DIR
from lora_sweep.lora import lora_settings
from lora_sweep.metrics import Difference, paired_bootstrap
from lora_sweep.placement import visible_gpus
from lora_sweep.driver import budget_spent
from lora_sweep.results import (TrialRecord, cost, promotion_rule, replace_folder, seed_spread, sweep_totals, write_atomically)
from lora_sweep.search_space import apply_params
from lora_sweep.storage import SweepFolder, is_directory
from lora_sweep.models import load_base_model, load_tokenizer

VERIFY_PROMPTS = 4


class ExportVerificationError(RuntimeError):
    pass


@dataclass
class FinalReport:
    best: TrialRecord
    base: EvalMetrics
    tuned: EvalMetrics
    max_logit_difference: float
    export_dir: Path


def best_trial_config(config: SweepConfig, best: TrialRecord) -> SweepConfig:
    """A config that re-runs the best trial alone: its params fixed, nothing to sample, no early stopping."""
    fixed = apply_params(config, best.params)
    return fixed.model_copy(update={
        "name": f"{config.name}-best",
        "search": fixed.search.model_copy(update={"space": None, "parameters": {}, "num_trials": 1,
                                                  "warm_start": None, "also_minimize": None}),
        "scheduler": fixed.scheduler.model_copy(update={"type": "none"}),
        "promotion": PromotionConfig(),
    })


def verify_tolerance(config: SweepConfig, merged: Any) -> float:
    """Merging rounds W + BA to the weights' dtype: 16-bit weights need a looser bound than float32."""
    if config.evaluation.verify_tolerance is not None:
        return config.evaluation.verify_tolerance
    return 1e-4 if next(merged.parameters()).dtype == torch.float32 else 5e-2


@torch.no_grad()
def max_logit_difference(a: Any, b: Any, prompts: list[list[int]]) -> float:
    worst = 0.0
    for ids in prompts:
        tensor = torch.tensor([ids])
        worst = max(worst, (a(input_ids=tensor).logits.float() - b(input_ids=tensor).logits.float()).abs().max().item())
    return worst


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:.4g}"


def adapter_note(config: SweepConfig, best: TrialRecord) -> str:
    init = apply_params(config, best.params).lora
    if init.init not in REWRITES_BASE_WEIGHTS:
        return ""
    return (f"; trained with `{init.init}` init and saved converted to a plain LoRA of rank {2 * init.rank} "
            "that applies to the unmodified base model")


def confirm_report(config: SweepConfig, best: TrialRecord) -> dict[str, Any]:
    """final_metrics.json's `confirm`: the setting, and the promoted configuration's metric per seed, mean and spread
    (no seeds when the confirm step was skipped: a spent budget)."""
    confirm = config.promotion.confirm
    if confirm is None:
        raise ValueError("confirm_summary is for a sweep with promotion.confirm")
    spread = seed_spread(best)
    summary = {"mean": spread[0], "std": spread[1], "seeds": spread[2]} if spread else {"seeds": 0}
    return {"top": confirm.top, "extra_seeds": confirm.seeds, "metric": config.search.metric,
            "seed_metrics": best.seed_metrics, **summary, "runs_file": CONFIRM_FILE}


def _confirm_sentence(config: SweepConfig, best: TrialRecord) -> str:
    spread = seed_spread(best)
    if spread is None:
        return ""
    mean, std, runs = spread
    per_seed = ", ".join(f"seed {seed}: {value:.4f}" for seed, value in best.seed_metrics.items())
    return (f"\nPromoted by `promotion.confirm`: validation `{config.search.metric}` of this configuration over {runs} "
            f"seeds {mean:.4f} ± {std:.2g} (mean ± std; {per_seed}); every confirmed configuration is in "
            f"`leaderboard.csv` (mean and std columns) and each run in `{CONFIRM_FILE}`.\n\n")


def model_card(config: SweepConfig, best: TrialRecord, base: EvalMetrics, tuned: EvalMetrics,
               provenance: dict[str, Any], difference: float, tolerance: float, totals: dict[str, Any],
               differences: dict[str, Difference] | None = None) -> str:
    params = "\n".join(f"| `{k}` | {v} |" for k, v in sorted(best.params.items())) or "| (fixed config) | |"
    versions = ", ".join(f"{k} {v}" for k, v in provenance.get("packages", {}).items())
    return f"""# LoRA fine-tune of `{config.model.path}` (sweep `{config.name}`)

Promoted from trial `{best.trial_id}` at step {best.best_step} of {best.steps_run} by a lora-sweep
hyperparameter sweep ({config.search.num_trials} trials, {config.search.sampler} sampler,
{config.scheduler.type} scheduler, metric `{config.search.metric}` ({config.search.mode})).
Promotion rule: {promotion_rule(config)}.{f" Its {config.search.also_minimize}: {_number(cost(best, config))}." if config.search.also_minimize else ""}

## Contents
- `adapter/`: the LoRA adapter (peft `save_pretrained`) and tokenizer{adapter_note(config, best)}
- `merged/`: base + adapter merged, safetensors, loadable with `AutoModelForCausalLM.from_pretrained`
- `best_config.yaml`: re-runs this trial alone with `sweep run best_config.yaml`

## Best hyperparameters
| parameter | value |
|---|---|
{params}

## Metrics
| split | model | loss | perplexity | exact match |
|---|---|---|---|---|
| val | tuned (best eval) | {best.best_metrics.get('eval_loss', float('nan')):.4f} | {best.best_metrics.get('eval_perplexity', float('nan')):.3f} | |
| test | base (untuned) | {base.loss:.4f} | {base.perplexity:.3f} | {shown_match(base.exact_match)} |
| test | tuned | {tuned.loss:.4f} | {tuned.perplexity:.3f} | {shown_match(tuned.exact_match)} |

Test split: {tuned.examples} examples, {tuned.response_tokens} response tokens, never seen during the search.
{_task_metrics_table(differences or {})}{_confirm_sentence(config, best)}Data format: `{provenance.get('data_format', 'instruction')}`; prompt template: `{provenance.get('template') or config.data.template or 'default'}`.

## Cost
The sweep's {totals['trials']} trials used {totals['device_seconds']:,.1f} device-seconds ({"GPU" if config.resources.gpu > 0 else "CPU"}
seconds times the devices each trial held){f", and its {totals['confirm_runs']} confirm runs {totals['confirm_device_seconds']:,.1f} more," if totals.get('confirm_runs') else ""} and processed {totals['tokens_seen']:,} training tokens; this trial
{best.device_seconds:,.1f} device-seconds and {best.tokens_seen:,} tokens.{f" The sweep ended early: {totals['budget_spent']}." if totals.get('budget_spent') else ""}

## Provenance
- base model: `{config.model.path}`
- data hash: `{provenance.get('data_hash')}` (counts {provenance.get('data_counts')})
- seed: {config.seed}
- git SHA: `{provenance.get('git_sha')}`
- packages: {versions}
- export verified: merged vs adapter logits differ by at most {difference:.2e} (tolerance {tolerance:g})
"""


def _task_metrics_table(differences: dict[str, Difference]) -> str:
    """The task metrics of the answers on the test split, base and tuned, with the difference's bootstrap interval."""
    if not differences:
        return ""
    rows = "\n".join(f"| {name} | {d.base:.4g} | {d.tuned:.4g} | {d.difference:+.4g} [{d.low:+.4g}, {d.high:+.4g}] |"
                     for name, d in differences.items())
    resamples = next(iter(differences.values())).resamples
    return f"""
| task metric (test, greedy answers) | base | tuned | tuned - base [95% interval] |
|---|---|---|---|
{rows}

The intervals are paired bootstrap percentiles ({resamples} resamples of the test examples, both models scored on
each resample).
"""


def save_adapter(tuned_model: Any, trial_config: SweepConfig, directory: Path) -> None:
    """The adapter as a plain LoRA that applies to the unmodified base model.

    A PiSSA or OLoRA adapter trains against base weights its init rewrote (W - B0 A0). It is saved
    converted (peft's `path_initial_model_for_weight_conversion`): a LoRA of twice the rank whose
    product is the change from the original weights, BA - B0 A0, loadable on the base like any LoRA
    and beside other adapters. B0 and A0 are recomputed from the original weights: the same exact
    SVD / QR as the trial's.
    """
    if trial_config.lora.init not in REWRITES_BASE_WEIGHTS:
        tuned_model.save_pretrained(directory)
        return
    with tempfile.TemporaryDirectory(prefix="lora-sweep-initial-") as scratch:
        original = load_base_model(trial_config)
        initial = peft.get_peft_model(original, lora_settings(trial_config.lora, original))
        initial_settings = initial.peft_config["default"]
        assert isinstance(initial_settings, peft.LoraConfig)
        initial_settings.init_lora_weights = True  # peft's rule: saved as a plain LoRA's init
        initial.save_pretrained(str(Path(scratch) / "initial"))
        del initial, original
        tuned_model.save_pretrained(directory, path_initial_model_for_weight_conversion=str(Path(scratch) / "initial"))


def finalize(folder: SweepFolder, config: SweepConfig, best: TrialRecord, data_path: Path,
             provenance: dict[str, Any]) -> FinalReport:
    """Evaluate base and promoted models on the test split, write final_metrics.json, export and verify."""
    sweep_dir = folder.local
    if not best.best_checkpoint or not is_directory(folder.filesystem, best.best_checkpoint):
        raise FileNotFoundError(f"the promoted checkpoint {best.best_checkpoint}{folder.where()} is missing")
    trial_config = apply_params(config, best.params)
    tokenizer = load_tokenizer(trial_config)
    test_set = load_prepared(data_path)["test"]
    settings: dict[str, Any] = dict(
        max_new_tokens=config.evaluation.max_new_tokens, batch_size=config.training.eval_batch_size,
        max_examples=config.evaluation.max_examples, metrics=config.evaluation.metrics,
        answers=provenance.get("data_format") != "text",
    )
    # The driver may sit on a GPU machine too: evaluate there when it can (greedy decoding on a CPU is slow),
    # spread over its GPUs when it has several (a model too big for one).
    gpus = visible_gpus()
    base_model = load_base_model(trial_config, spread_over_gpus=gpus >= 2)
    if gpus == 1:
        base_model = base_model.to("cuda")
    base_metrics = evaluate_model(base_model, tokenizer, test_set, **settings)
    # For PiSSA / OLoRA, loading redoes the init's decomposition: the base becomes the residual the trial trained on.
    with folder.local_checkpoint(best.best_checkpoint) as checkpoint:  # fetched from storage when there
        tuned_model = peft.PeftModel.from_pretrained(base_model, str(checkpoint))
    tuned_metrics = evaluate_model(tuned_model, tokenizer, test_set, **settings)
    totals = {**sweep_totals(sweep_dir), "budget_spent": budget_spent(sweep_dir)}
    # Each task metric's tuned - base difference on the same test answers, with its paired bootstrap interval.
    scored = config.evaluation.metrics if settings["answers"] else []  # text data: nothing answered to score
    differences = paired_bootstrap(scored, base_metrics.completions, tuned_metrics.completions,
                                   tuned_metrics.references, seed=config.seed)
    write_atomically(sweep_dir / FINAL_METRICS_FILE, json.dumps({
        "trial_id": best.trial_id, "step": best.best_step, "params": best.params,
        "validation": best.best_metrics, "test": {"base": base_metrics.as_json(), "tuned": tuned_metrics.as_json()},
        "task_metrics": {name: asdict(d) for name, d in differences.items()},
        "sweep": totals, "promotion": promotion_rule(config),
        **({"confirm": confirm_report(config, best)} if config.promotion.confirm else {}),
    }, indent=2))

    staging = sweep_dir / f".{EXPORT_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        return _export(sweep_dir, config, best, trial_config, tuned_model, tokenizer, test_set, staging, gpus,
                       base_metrics, tuned_metrics, provenance, totals, differences)
    except ExportVerificationError:
        raise  # its staging folder is left for inspection, as its message says
    except BaseException:  # a full disk, a Ctrl-C: the previous export stays as it was, and no partial one is left
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _export(sweep_dir: Path, config: SweepConfig, best: TrialRecord, trial_config: SweepConfig, tuned_model: Any,
            tokenizer: Any, test_set: Any, staging: Path, gpus: int, base_metrics: EvalMetrics,
            tuned_metrics: EvalMetrics, provenance: dict[str, Any], totals: dict[str, Any],
            differences: dict[str, Difference]) -> FinalReport:
    """Write the export to `staging`, verify it from disk, then swap it in for the previous one."""
    save_adapter(tuned_model, trial_config, staging / "adapter")
    tokenizer.save_pretrained(staging / "adapter")
    # Merge, export and verify on the CPU, where every user can load it. A model spread over GPUs is not
    # moved (accelerate's hooks stay with it): a fresh CPU copy takes the adapter just saved instead.
    if gpus >= 2:
        tuned_model = peft.PeftModel.from_pretrained(load_base_model(trial_config), staging / "adapter")
    tuned_model = tuned_model.to("cpu")
    tuned_model.merge_and_unload().save_pretrained(staging / MERGED_DIR, safe_serialization=True)
    tokenizer.save_pretrained(staging / MERGED_DIR)

    # Verify from disk, as a user would load them: plain transformers vs base + adapter.
    prompts = prompt_token_ids(test_set.select(range(min(VERIFY_PROMPTS, len(test_set)))))
    merged = AutoModelForCausalLM.from_pretrained(staging / MERGED_DIR, trust_remote_code=config.model.trust_remote_code)
    merged.eval()
    adapter = peft.PeftModel.from_pretrained(load_base_model(trial_config), staging / "adapter").eval()
    difference = max_logit_difference(merged, adapter, prompts)
    tolerance = verify_tolerance(config, merged)
    if not difference <= tolerance:
        raise ExportVerificationError(
            f"merged and adapter logits differ by {difference:.3e} > evaluation.verify_tolerance "
            f"{tolerance:g}; the export was left in {staging} for inspection"
        )
    (staging / "README.md").write_text(
        model_card(config, best, base_metrics, tuned_metrics, provenance, difference, tolerance, totals, differences),
        encoding="utf-8"
    )
    (staging / "best_config.yaml").write_text(config_to_yaml(best_trial_config(config, best)), encoding="utf-8")
    final = sweep_dir / EXPORT_DIR
    replace_folder(staging, final)
    return FinalReport(best, base_metrics, tuned_metrics, difference, final)

