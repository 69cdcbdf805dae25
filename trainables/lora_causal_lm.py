"""The LoRA causal-LM trainable: what runs inside one trial.

A thin shell around the Hugging Face Trainer: setup (base model + LoRA from the
trial's params) -> train (evaluate every `eval_steps`, report each evaluation
with a checkpoint: adapter weights and optimizer state, never the base model)
-> cleanup. Reporting sits behind `Reporter`, so the same code runs under Ray
Tune and in a plain unit test.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterator, Optional, Protocol

import peft
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from lora_sweep.config import REWRITES_BASE_WEIGHTS, ConfigError, SweepConfig, shown_path
from lora_sweep.data import MODEL_COLUMNS, PaddingCollator, load_prepared
from lora_sweep.direction import Direction
from lora_sweep.lora import lora_settings, targeted_module_names
from lora_sweep.placement import cuda_devices_for_trial, loading_kwargs, trial_loading_kwargs
from lora_sweep.storage import local_prepared_data
from lora_sweep.search_space import apply_params
from lora_sweep.testing import faults
from lora_sweep.trial_report import EVAL_LOSS, NODE_ID, TrialReport


class Reporter(Protocol):
    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None: ...

    def restored_checkpoint(self) -> ContextManager[Optional[Path]]:
        """The checkpoint a restarted trial resumes from (None for a fresh trial), valid inside the block."""
        ...


class TuneReporter:
    """Reports to Ray Tune; the checkpoint folder is copied to the sweep's storage by Tune."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        import ray
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Which Ray node ran the trial: on a cluster, the first thing to know about a slow or failed one.
        tune.report({**metrics, NODE_ID: ray.get_runtime_context().get_node_id()}, checkpoint=checkpoint)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Optional[Path]]:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)


@dataclass
class ListReporter:
    """Keeps every report in memory (tests, and single runs outside Tune)."""

    reports: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_files: list[list[str]] = field(default_factory=list)  # checkpoints are temporary: keep a listing
    keep_checkpoints_in: Optional[Path] = None  # copy each checkpoint here (as step-N/) when set
    resume_from: Optional[Path] = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        self.reports.append(dict(metrics))
        self.checkpoint_files.append(sorted(os.listdir(checkpoint_dir)) if checkpoint_dir else [])
        if checkpoint_dir and self.keep_checkpoints_in:
            shutil.copytree(checkpoint_dir, self.keep_checkpoints_in / f"step-{metrics['step']}")

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Optional[Path]]:
        yield self.resume_from


@dataclass
class TrialOutcome:
    """How a trial ended when it ran to its own end (an ASHA stop ends it inside `report`)."""

    steps: int
    diverged_reason: Optional[str]
    best_metric: Optional[float]


def pick_device(resources_gpu: float) -> tuple[bool, bool, bool]:
    """(use_cpu, bf16, fp16): the GPU Ray assigned if there is one, bf16 where supported."""
    if resources_gpu > 0 and torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return False, bf16, not bf16
    return True, False, False


class _EvaluationReporter(TrainerCallback):
    """Turns each Trainer evaluation into one report, and stops training on a NaN/inf loss.

    The Trainer saves a checkpoint right after each evaluation (adapter weights plus
    optimizer, scheduler, RNG and step: never the base model); `on_save` reports the
    evaluation's metrics with that checkpoint, so a restarted trial resumes exactly.
    """

    def __init__(self, reporter: Reporter, metric: str, mode: str, trial_started: float, adapter_params: int):
        self.reporter = reporter
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

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_at_last_report = int(state.num_input_tokens_seen)  # non-zero after a resume

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()
        if self.startup_seconds is None:
            self.startup_seconds = self._step_started - self.trial_started

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._step_started

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.last_train_loss = float(logs["loss"])
            if not math.isfinite(self.last_train_loss) and self.diverged_reason is None:
                self.diverged_reason = f"training loss became {self.last_train_loss} at step {state.global_step}"
                control.should_training_stop = True
                control.should_evaluate = True  # so the divergence is reported at this step
        if "learning_rate" in logs:
            self.last_learning_rate = float(logs["learning_rate"])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
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
            self.reporter.report(report.diverging(self.metric, self.direction.worst, self.diverged_reason).as_dict(), None)
            return
        value = getattr(report, self.metric)
        if self.direction.is_better(value, self.best):
            self.best = value
        self.pending = report.as_dict()
        control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if self.pending is None:
            return
        report, self.pending = self.pending, None
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # Tune copies the folder to the sweep's storage inside report(), so the local copy
        # goes at once instead of piling up per evaluation. An ASHA stop ends the trial
        # inside report() (SystemExit); the finally-block and the scratch folder clean up.
        try:
            self.reporter.report(report, checkpoint)
        finally:
            shutil.rmtree(checkpoint, ignore_errors=True)


def load_base_model(config: SweepConfig, for_trial: bool = False, spread_over_gpus: bool = False) -> Any:
    """The base model. Outside a trial (final evaluation, export): full precision, on the CPU, or spread over
    this machine's GPUs (`spread_over_gpus`).

    In a trial: placed as `lora_sweep.placement` says for the GPUs Ray gave it: across several GPUs, or in
    4 bits (QLoRA, prepared for k-bit training once per load: norms in float32, base frozen).
    """
    kwargs = (trial_loading_kwargs(config, cuda_devices_for_trial(config)) if for_trial
              else loading_kwargs(config, spread_over_gpus))
    model = AutoModelForCausalLM.from_pretrained(config.model.path, **kwargs)
    if for_trial and config.model.quantization != "none":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training.gradient_checkpointing)
    return model


# Base models kept by this worker process between trials (Ray Tune reuses the process).
_BASE_MODELS: dict[tuple[str, str, bool, str], Any] = {}


def _model_key(config: SweepConfig) -> tuple[str, str, bool, str]:
    return (config.model.path, config.model.dtype, config.model.trust_remote_code, config.model.quantization)


def take_base_model(config: SweepConfig) -> Any:
    """The base model: the one this worker kept from its last trial, or loaded now.

    A worker loads it once, which saves the load wherever it is slow (large models,
    cold or network disks; BENCHMARKS.md has the figure on this machine, where it
    is small). LoRA only adds modules beside the frozen base weights;
    `give_back_base_model` takes them out again, so every trial starts from the
    untouched base.
    """
    return _BASE_MODELS.pop(_model_key(config), None) or load_base_model(config, for_trial=True)


def give_back_base_model(config: SweepConfig, base: Any) -> None:
    # Gradient checkpointing leaves hooks that LoRA's unload does not remove: such a base is not reused.
    if not config.training.gradient_checkpointing:
        _BASE_MODELS.clear()  # one model per worker: memory is the scarce resource
        _BASE_MODELS[_model_key(config)] = base


def weights_the_init_rewrites(base: Any, config: SweepConfig, settings: peft.LoraConfig) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights PiSSA or OLoRA will rewrite (only the adapted layers'), so that the base
    model this worker keeps goes back to the next trial as it was loaded. Empty for every other init."""
    if config.lora.init not in REWRITES_BASE_WEIGHTS:
        return {}
    modules = dict(base.named_modules())
    return {name: modules[name].weight.detach().to("cpu", copy=True)
            for name in targeted_module_names(base, settings.target_modules)}


@torch.no_grad()
def put_back_weights(base: Any, saved: dict[str, torch.Tensor]) -> Any:
    modules = dict(base.named_modules())
    for name, weight in saved.items():
        modules[name].weight.copy_(weight)
    return base


_long_lived_objects_frozen = False


def freeze_long_lived_objects() -> None:
    """Once per worker process: take what is alive now (imported modules, Ray) out of the cyclic GC's scans.

    The Trainer starts every `train()` with a full `gc.collect()` (accelerate's `free_memory`).
    With torch, transformers and peft imported that walks about 430,000 objects: 0.23 s of a
    0.30 s trial start-up, paid by every trial. Frozen objects are still freed by reference
    counting; only reference cycles among them are never collected, and they are imports that
    live as long as the process. Objects made later (each trial's Trainer, LoRA layers, the
    kept base model) are scanned and collected as before.
    """
    global _long_lived_objects_frozen
    if not _long_lived_objects_frozen:
        gc.collect()  # garbage made so far goes now, not into the frozen generation
        gc.freeze()
        _long_lived_objects_frozen = True


def load_tokenizer(config: SweepConfig) -> Any:
    """The model's tokenizer, padding with its EOS when it has no pad token.

    Refuses (a `model` ConfigError, so `sweep run` reports it before anything is written) a model folder without
    a tokenizer, a tokenizer that does not load, and one without an EOS: every response ends with it.
    """

    path = config.model.path
    named = shown_path(path)
    folder = Path(path).expanduser()
    # Files that make a tokenizer to transformers. With none of them it fails with a message about converting a
    # sentencepiece tokenizer, which does not say that the tokenizer was never saved beside the model.
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                       "vocab.txt", "sentencepiece.bpe.model")
    if folder.is_dir() and not any((folder / name).is_file() for name in tokenizer_files):
        raise ConfigError([f"`model.path`: no tokenizer in {named} (tokenizer.json / tokenizer_config.json / "
                           "tokenizer.model ...); save it beside the model with tokenizer.save_pretrained"], "model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    except Exception as error:  # a damaged file fails as a KeyError, a bare Exception from tokenizers, ...
        reason = (str(error).strip().splitlines() or [""])[0][:120]
        raise ConfigError([f"`model.path`: cannot load the tokenizer in {named} ({type(error).__name__}: {reason})"],
                          "model") from None
    if tokenizer.eos_token_id is None:
        lacks = "neither an EOS nor a pad token" if tokenizer.pad_token_id is None else "no EOS token"
        raise ConfigError([f"`model.path`: the tokenizer in {named} has {lacks}; training needs an EOS to end "
                           "responses (set eos_token in its tokenizer_config.json)"], "model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
        **({"gradient_checkpointing": True} if t.gradient_checkpointing else {}),
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        logging_steps=max(1, min(10, t.eval_steps)),
        logging_nan_inf_filter=False,  # the Trainer would hide a NaN loss; divergence must show
        # Checkpoint at every evaluation; _EvaluationReporter hands each one to Tune, then deletes it.
        save_strategy="steps",
        save_steps=t.eval_steps,
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=use_cpu,
        bf16=bf16,
        fp16=fp16,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def run_trial(params: dict[str, Any], base_config: dict[str, Any], data_path: str, reporter: Reporter) -> TrialOutcome:
    """Train one LoRA adapter with the trial's params, reporting every evaluation."""
    started = time.perf_counter()
    freeze_long_lived_objects()
    config = apply_params(SweepConfig.model_validate(base_config), params)
    set_seed(config.seed)
    use_cpu, _, _ = pick_device(config.resources.gpu)
    if use_cpu:  # also a trial given a GPU on a machine without CUDA: it falls back to its CPU share
        torch.set_num_threads(max(1, int(config.resources.cpu)))
    tokenizer = load_tokenizer(config)
    data = load_prepared(data_path)
    train_set = data["train"].select_columns(MODEL_COLUMNS)
    val_set = data["val"].select_columns(MODEL_COLUMNS)
    collator = PaddingCollator.for_tokenizer(tokenizer)
    base = take_base_model(config)
    settings = lora_settings(config.lora, base)
    rewritten = weights_the_init_rewrites(base, config, settings)
    model = peft.get_peft_model(base, settings)
    if config.training.gradient_checkpointing:
        model.enable_input_require_grads()
    try:
        return _train(config, params, model, train_set, val_set, collator, reporter, started)
    finally:
        # Also when ASHA ends the trial inside a report (SystemExit). If unload or the restore fails, nothing is kept.
        give_back_base_model(config, put_back_weights(model.unload(), rewritten))


def _train(config: SweepConfig, params: dict[str, Any], model: Any, train_set: Any, val_set: Any, collator: Any,
           reporter: Reporter, started: float) -> TrialOutcome:
    with tempfile.TemporaryDirectory(prefix="lora-sweep-trial-") as scratch:
        adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        callback = _EvaluationReporter(reporter, config.search.metric, config.search.mode, started, adapter_params)
        trainer = Trainer(
            model=model,
            args=training_arguments(config, os.path.join(scratch, "trainer")),
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=collator,
            callbacks=[callback],
            optimizers=(loraplus_optimizer(config, model), None),
        )
        for hook in faults.trainer_callbacks(json.dumps(params, sort_keys=True, default=str), model):
            trainer.add_callback(hook)  # test hooks: none unless armed
        trainer.remove_callback(PrinterCallback)  # reports go to Tune; per-step prints only flood the log
        with reporter.restored_checkpoint() as resume_from:
            # A retried or resumed trial continues from its last checkpoint: weights, optimizer, step, data order.
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return TrialOutcome(steps=trainer.state.global_step, diverged_reason=callback.diverged_reason, best_metric=callback.best)


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


def tune_trainable(params: dict[str, Any], base_config: dict[str, Any], data_path: str,
                   data_in_storage: Optional[str] = None) -> None:
    """Ray Tune's entry point (bound with `tune.with_parameters`)."""
    data_path = local_prepared_data(data_path, data_in_storage, base_config["storage"])
    run_trial(params, base_config, data_path, TuneReporter())


def confirm_trainable(params: dict[str, Any], base_config: dict[str, Any], data_path: str,
                      data_in_storage: Optional[str] = None) -> None:
    """Ray Tune's entry point for `promotion.confirm`'s runs: `params` is {"run": {"of", "seed", "params"}},
    one of the sweep's configurations trained again with another seed (its initialisation and data order)."""
    run = params["run"]
    tune_trainable(run["params"], {**base_config, "seed": run["seed"]}, data_path, data_in_storage)
