"""The LoRA causal-LM trainable (`trainable: lora_causal_lm`): a LoRA adapter trained with the Hugging Face Trainer.

setup (the kept base model + LoRA from the trial's params, the prepared data) -> train (evaluate every
`eval_steps`, report each evaluation with a checkpoint: adapter weights and optimizer state, never the base
model) -> cleanup (the base model, without LoRA and as it was loaded, goes back to this worker's cache).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import peft
import torch
from transformers import (PrinterCallback, Trainer, TrainerCallback, TrainerControl, TrainerState,
                          TrainingArguments)

from lora_sweep.config import SweepConfig
from lora_sweep.data import PaddingCollator, load_prepared, model_columns, prompt_token_ids
from lora_sweep.evaluate import greedy_completions
from lora_sweep.metrics import compute
from lora_sweep.direction import Direction
from lora_sweep.distributed import from_rank_zero
from lora_sweep.lora import lora_settings
from lora_sweep.models import (give_back_base_model, load_tokenizer, put_back_weights, take_base_model,
                               weights_the_init_rewrites)
from lora_sweep.placement import pick_device
from lora_sweep.recipe import Recipe, Reporter, TrialOutcome
from lora_sweep.testing import faults
from lora_sweep.trial_report import EVAL_LOSS, TrialReport


class LoraCausalLM(Recipe):
    """LoRA (and its variants: DoRA, rsLoRA, PiSSA/OLoRA inits, LoRA+) on a causal LM, trained by the Trainer."""

    name = "lora_causal_lm"

    def setup(self) -> None:
        config = self.config
        use_cpu, _, _ = pick_device(config.resources.gpu)
        if use_cpu:  # also a trial given a GPU on a machine without CUDA: it falls back to its CPU share
            torch.set_num_threads(max(1, int(config.resources.cpu)))
        tokenizer = load_tokenizer(config)
        data = load_prepared(self.data_path)
        self.train_set = data["train"].select_columns(model_columns(data["train"]))
        self.val_set = data["val"].select_columns(model_columns(data["val"]))
        self.collator = PaddingCollator.for_tokenizer(tokenizer)
        self.scorer = answer_scorer(config, tokenizer, data["val"])
        base = take_base_model(config)
        settings = lora_settings(config.lora, base)
        self.rewritten = weights_the_init_rewrites(base, config, settings)
        if config.data.packing:
            # transformers isolates packed examples only when the forward pass has no KV cache (it skips its
            # packed-sequence masks when there is one), and training never reads the cache it would build.
            base.config.use_cache = False
        self.model: Any = peft.get_peft_model(base, settings)
        if config.training.gradient_checkpointing:
            self.model.enable_input_require_grads()

    def train(self) -> TrialOutcome:
        config, model, reporter = self.config, self.model, self.reporter
        with tempfile.TemporaryDirectory(prefix="lora-sweep-trial-") as scratch:
            adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            callback = EvaluationReporter(reporter, config.search.metric, config.search.mode, self.started,
                                          adapter_params, self.scorer, config.evaluation.generate_every)
            trainer = SweepTrainer(
                model=model,
                args=training_arguments(config, os.path.join(scratch, "trainer")),
                train_dataset=self.train_set,
                eval_dataset=self.val_set,
                data_collator=self.collator,
                callbacks=[callback],
                optimizers=(loraplus_optimizer(config, model), None),
            )
            for hook in faults.trainer_callbacks(json.dumps(self.params, sort_keys=True, default=str), model):
                trainer.add_callback(hook)  # test hooks: none unless armed
            trainer.remove_callback(PrinterCallback)  # reports go to Tune; per-step prints only flood the log
            with reporter.restored_checkpoint() as resume_from:
                # A retried or resumed trial continues from its last checkpoint: weights, optimizer, step, data order.
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        return TrialOutcome(steps=trainer.state.global_step, diverged_reason=callback.diverged_reason,
                            best_metric=callback.best)

    def cleanup(self) -> None:
        # Also when ASHA ends the trial inside a report (SystemExit). If unload or the restore fails, nothing is kept.
        if hasattr(self, "model"):
            give_back_base_model(self.config, put_back_weights(self.model.unload(), self.rewritten))


class SweepTrainer(Trainer):
    """The Hugging Face Trainer, evaluating in a data-parallel trial as it does in one process.

    With several processes, transformers scales each process's evaluation loss by the tokens of all processes
    (`average_tokens_across_devices`, right for training's gradients), but then averages those values per
    example and drops the examples padded onto the last batch: measured on 7 validation examples, 5.130 for two
    processes against 5.575 for one. Without that scaling each process's loss is its batch's mean, as in one
    process: the same eval_loss when the batches hold the same examples (eval_batch_size 1: equal to 1e-6)."""

    def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
        averaged = self.args.average_tokens_across_devices
        self.args.average_tokens_across_devices = False
        try:
            return super().prediction_step(*args, **kwargs)
        finally:
            self.args.average_tokens_across_devices = averaged


def answer_scorer(config: SweepConfig, tokenizer: Any, val_set: Any) -> Optional[Callable[[Any], dict[str, float]]]:
    """What a trial's evaluation adds when it generates: greedy answers (batched, with the KV cache) to the first
    `evaluation.val_examples` validation examples, scored by `evaluation.metrics`. None when trials do not generate."""
    count = min(config.generated_val_examples, len(val_set))
    if count == 0:
        return None
    subset = val_set.select(range(count))
    prompts, references = prompt_token_ids(subset), [r.strip() for r in subset["response"]]
    settings = config.evaluation

    def score(model: Any) -> dict[str, float]:
        training = model.training
        model.eval()
        try:
            answers = greedy_completions(model, tokenizer, prompts, settings.max_new_tokens,
                                         config.training.eval_batch_size)
        finally:
            model.train(training)
        return compute(settings.metrics, answers, references)

    # In a data-parallel trial rank 0 answers, and every rank reports its scores.
    return lambda model: from_rank_zero(lambda: score(model))


class EvaluationReporter(TrainerCallback):
    """Turns each Trainer evaluation into one report, and stops training on a NaN/inf loss.

    The Trainer saves a checkpoint right after each evaluation (adapter weights plus
    optimizer, scheduler, RNG and step: never the base model); `on_save` reports the
    evaluation's metrics with that checkpoint, so a restarted trial resumes exactly.
    """

    def __init__(self, reporter: Reporter, metric: str, mode: str, trial_started: float, adapter_params: int,
                 scorer: Optional[Callable[[Any], dict[str, float]]] = None, generate_every: int = 1):
        self.reporter = reporter
        # Task metrics of generated answers (`evaluation.metrics`): computed at every `generate_every`-th
        # evaluation from the model being trained; the reports between repeat the last values.
        self.scorer, self.generate_every = scorer, generate_every
        self.evaluations = 0
        self.task_metrics: dict[str, float] = {}
        self.adapter_params = adapter_params
        self.trial_started = trial_started
        self.startup_seconds: Optional[float] = None
        self.metric = metric
        self.direction = Direction(mode)
        self.last_train_loss: Optional[float] = None
        self.last_learning_rate: Optional[float] = None
        self.train_seconds = 0.0
        self.tokens_at_last_report = 0
        self.seconds_at_last_report = 0.0
        self.diverged_reason: Optional[str] = None
        self.best: Optional[float] = None
        self.pending: Optional[dict[str, Any]] = None
        self._step_started = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.tokens_at_last_report = int(state.num_input_tokens_seen)  # non-zero after a resume

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._step_started = time.perf_counter()
        if self.startup_seconds is None:
            self.startup_seconds = self._step_started - self.trial_started

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.train_seconds += time.perf_counter() - self._step_started

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Optional[dict[str, float]] = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.last_train_loss = float(logs["loss"])
            if not math.isfinite(self.last_train_loss) and self.diverged_reason is None:
                self.diverged_reason = f"training loss became {self.last_train_loss} at step {state.global_step}"
                control.should_training_stop = True
                control.should_evaluate = True  # so the divergence is reported at this step
        if "learning_rate" in logs:
            self.last_learning_rate = float(logs["learning_rate"])

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: Optional[dict[str, float]] = None, **kwargs: Any) -> None:
        metrics = metrics or {}
        eval_loss = float(metrics.get(EVAL_LOSS, math.nan))
        if not math.isfinite(eval_loss) and self.diverged_reason is None:
            self.diverged_reason = f"eval loss became {eval_loss} at step {state.global_step}"
            control.should_training_stop = True
        tokens = int(state.num_input_tokens_seen)
        seconds = self.train_seconds - self.seconds_at_last_report
        report = TrialReport(
            step=state.global_step,
            eval_loss=eval_loss,
            eval_perplexity=math.exp(min(eval_loss, 50.0)) if math.isfinite(eval_loss) else math.inf,
            train_loss=self.last_train_loss if self.last_train_loss is not None else math.nan,
            learning_rate=self.last_learning_rate if self.last_learning_rate is not None else 0.0,
            tokens_per_second=(tokens - self.tokens_at_last_report) / seconds if seconds > 0 else 0.0,
            tokens_seen=tokens,
            train_seconds=self.train_seconds,
            startup_seconds=self.startup_seconds if self.startup_seconds is not None else 0.0,
            diverged=False,
            device=str(args.device),
            adapter_params=self.adapter_params,
            eval_ms_per_example=1000.0 / metrics["eval_samples_per_second"]
            if metrics.get("eval_samples_per_second") else math.nan,
        )
        self.tokens_at_last_report, self.seconds_at_last_report = tokens, self.train_seconds
        if self.diverged_reason is not None:
            # Schedulers and samplers compare numbers: a diverged trial reports the worst one,
            # and no checkpoint of a diverged model is kept.
            control.should_save = False
            # A task metric as the sweep metric is no field of the report: set here, even before the first
            # generation gave one (Tune refuses a result without the sweep metric and would end the sweep).
            worst = {**self.task_metrics, self.metric: self.direction.worst} if not hasattr(report, self.metric) else {}
            diverged = report.diverging(self.metric, self.direction.worst, self.diverged_reason)
            self.reporter.report(diverged.as_dict(worst), None)
            return
        if self.scorer is not None and self.evaluations % self.generate_every == 0:
            self.task_metrics = self.scorer(kwargs["model"])
        self.evaluations += 1
        flat = report.as_dict(self.task_metrics)
        value = flat[self.metric]
        if self.direction.is_better(value, self.best):
            self.best = value
        self.pending = flat
        control.should_save = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.pending is None:
            return
        report, self.pending = self.pending, None
        checkpoint = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"  # set: the recipe gives one
        # Tune copies the folder to the sweep's storage inside report(), so the local copy
        # goes at once instead of piling up per evaluation. An ASHA stop ends the trial
        # inside report() (SystemExit); the finally-block and the scratch folder clean up.
        try:
            self.reporter.report(report, checkpoint)
        finally:
            shutil.rmtree(checkpoint, ignore_errors=True)


def training_arguments(config: SweepConfig, output_dir: str) -> TrainingArguments:
    t = config.training
    use_cpu, bf16, fp16 = pick_device(config.resources.gpu)
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        warmup_steps=int(t.warmup_ratio * t.max_steps),
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        # Passed only when on: the name is deprecated in transformers 5 and warns on every trial.
        **({"gradient_checkpointing": True} if t.gradient_checkpointing else {}),  # type: ignore[arg-type]
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        logging_steps=max(1, min(10, t.eval_steps)),
        logging_nan_inf_filter=False,  # the Trainer would hide a NaN loss; divergence must show
        # Checkpoint at every evaluation; EvaluationReporter hands each one to Tune, then deletes it.
        save_strategy="steps",
        save_steps=t.eval_steps,
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=use_cpu,
        bf16=bf16,
        fp16=fp16,
        # Packed rows carry no attention mask to count by (and almost no padding): every token is counted.
        include_num_input_tokens_seen="all" if config.data.packing else "non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def loraplus_optimizer(config: SweepConfig, model: Any) -> Optional[torch.optim.Optimizer]:
    """LoRA+ (peft's `create_loraplus_optimizer`): AdamW with B's learning rate `loraplus_lr_ratio` times A's.

    None leaves the Trainer's own AdamW. The Trainer still builds the schedule, and a resumed trial
    restores this optimizer's state like any other.
    """
    ratio = config.lora.loraplus_lr_ratio
    if ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=config.training.learning_rate,
                                     loraplus_lr_ratio=ratio, weight_decay=config.training.weight_decay)
