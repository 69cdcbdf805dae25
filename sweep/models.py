"""Loading the base model and its tokenizer: one module for the trials, the checks and the final evaluation.

The trainable (in each trial), `lora_sweep.preflight` (before the sweep) and `lora_sweep.export` (the final
evaluation) load models only through here, so the engine never imports a trainable to get a model. A Ray worker
keeps its base model between trials (`take_base_model` / `give_back_base_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_sweep.config import REWRITES_BASE_WEIGHTS, ConfigError, SweepConfig, shown_path
from lora_sweep.lora import targeted_module_names
from lora_sweep.placement import cuda_devices_for_trial, loading_kwargs, trial_loading_kwargs


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
            for name in targeted_module_names(base, settings.target_modules or [])}


@torch.no_grad()
def put_back_weights(base: Any, saved: dict[str, torch.Tensor]) -> Any:
    modules = dict(base.named_modules())
    for name, weight in saved.items():
        modules[name].weight.copy_(weight)
    return base


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
