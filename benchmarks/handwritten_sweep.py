"""The baseline: a Ray Tune + Trainer LoRA sweep written by hand, the way users write one today.

Each trial reads and tokenizes the data itself, loads the base model, attaches
LoRA, trains with the Trainer and reports each evaluation with a Trainer
checkpoint. The driver uses OptunaSearch and ASHA, with no worker reuse and no
shared data preparation.

    python benchmarks/handwritten_sweep.py CONFIG.yaml OUT_DIR [key=value ...]

It reads the same sweep YAML as `sweep run`, so that both run the same trials.
It prints one JSON line with the wall time and each trial's training seconds.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import optuna
import peft
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments)

from lora_sweep.config import load_config
from lora_sweep.data import IGNORE_INDEX, load_examples, tokenize_example
from lora_sweep.lora import lora_settings
from lora_sweep.search_space import apply_params, build_search_space
from lora_sweep.templates import prompt_renderer


def trainable(params, base_config):
    config = apply_params(type(base_config).model_validate(base_config.model_dump()), params)
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    splits, _ = load_examples(config.data, config.seed)  # every trial prepares the data again
    render = prompt_renderer(config.data.template, tokenizer)
    rows = {s: [r for r in (tokenize_example(e, render, tokenizer, config.data.max_length) for e in splits[s]) if r]
            for s in ("train", "val")}
    rows = {s: [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in v] for s, v in rows.items()}
    model = AutoModelForCausalLM.from_pretrained(config.model.path)
    model = peft.get_peft_model(model, lora_settings(config.lora, model))
    import torch

    torch.set_num_threads(1)

    class Report(TrainerCallback):
        seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.started

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.metrics = {"eval_loss": metrics["eval_loss"], "step": state.global_step, "train_seconds": self.seconds}
            control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tune.report(self.metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)))

    t = config.training
    with tempfile.TemporaryDirectory() as out:
        Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=out, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
                per_device_eval_batch_size=t.eval_batch_size, learning_rate=t.learning_rate, eval_strategy="steps",
                eval_steps=t.eval_steps, save_strategy="steps", save_steps=t.eval_steps, report_to=[], use_cpu=True,
                disable_tqdm=True, logging_steps=10, seed=config.seed,
            ),
            train_dataset=rows["train"], eval_dataset=rows["val"],
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
            callbacks=[Report()],
        ).train()


def main() -> None:
    config_path, out_dir, *overrides = sys.argv[1:]
    config = load_config(config_path, overrides)
    space = build_search_space(config)
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False)
    scheduler = (FIFOScheduler() if config.scheduler.type == "none" else ASHAScheduler(
        time_attr="step", max_t=config.training.max_steps, grace_period=config.scheduler.grace_period,
        reduction_factor=config.scheduler.reduction_factor))
    started = time.perf_counter()
    results = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, base_config=config), {"cpu": config.resources.cpu}),
        tune_config=tune.TuneConfig(
            metric="eval_loss", mode="min", num_samples=config.search.num_trials, scheduler=scheduler,
            max_concurrent_trials=config.search.max_concurrent_trials,
            search_alg=OptunaSearch(space=space, metric="eval_loss", mode="min",
                                    sampler=optuna.samplers.TPESampler(seed=config.seed)),
        ),
        run_config=tune.RunConfig(storage_path=str(Path(out_dir).resolve()), name="handwritten", verbose=0),
    ).fit()
    wall = time.perf_counter() - started
    train = [r.metrics.get("train_seconds", 0.0) for r in results]
    print(json.dumps({"wall_seconds": wall, "train_seconds": train}))


if __name__ == "__main__":
    main()
