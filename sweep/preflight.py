"""The checks `sweep run`, `sweep resume` and `sweep plan` make before anything runs or is written.

One owner for "is this sweep possible": the config's search space, the resources, the output folder, the
storage, the cluster address, the model (a safe causal LM that fits the data), the data itself and the disk.
`preflight` runs them all and returns what they found, so the plan shows exactly what the run would use.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna.distributions as od
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from transformers.utils.import_utils import check_torch_load_is_safe

from lora_sweep.config import ConfigError, SweepConfig, shown_path
from lora_sweep.data import TokenizedData, load_samples, tokenize_splits
from lora_sweep.disk import check_free_space, disk_needs, nearest_existing
from lora_sweep.driver import check_cluster_address, concurrent_trials, local_ray_resources
from lora_sweep.lora import largest_adapter, resolve_target_modules
from lora_sweep.metrics import check_metrics
from lora_sweep.placement import check_placement, model_positions
from lora_sweep.search_space import build_search_space
from lora_sweep.storage import check_storage, open_storage
from lora_sweep.testing.faults import check_test_hooks
from lora_sweep.trackers import check_trackers
from lora_sweep.trial_report import OBJECTIVE_METRICS, RESERVED_KEYS
from lora_sweep.models import load_tokenizer

log = logging.getLogger(__name__)


def local_model_missing(path: str) -> bool:
    """A `model.path` written as a local folder (not a hub id) that is not there."""
    return path.startswith((".", "/", "~")) and not Path(path).expanduser().is_dir()


def check_model(config: SweepConfig, space: dict[str, od.BaseDistribution]) -> torch.nn.Module:
    """The model exists, is a causal LM whose weights load safely, has positions for `data.max_length` tokens,
    and every target-module setting the sweep can pick matches it.

    Returns the model's skeleton: its modules on the meta device, with no weights.
    """
    path = config.model.path
    named = shown_path(path)
    folder = Path(path).expanduser()
    if local_model_missing(path):
        raise ConfigError([f"`model.path`: folder not found: {path}"], "model")
    try:
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError([f"`model.path`: cannot load a model config from {named} ({reason})"], "model") from None
    # An encoder is refused by what transformers knows of it, not by a list of names. transformers maps encoders
    # (BERT, RoBERTa, ELECTRA, XLM-R, ...) to a *ForCausalLM class too, but that class attends both ways unless the
    # config sets `is_decoder: true`, so each token would see the very token it is trained to predict. The model
    # types that transformers also gives a masked-LM head are exactly these encoders and the encoder-decoders
    # (BART, mBART, ...), whose causal class is the decoder half alone, without the encoder it was trained with.
    model_type = getattr(model_config, "model_type", None)
    if getattr(model_config, "is_encoder_decoder", False):
        raise ConfigError([f"`model.path`: {named} is an encoder-decoder (model_type {model_type}), not a causal LM; "
                           "LoRA here trains decoder-only models"], "model")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(model_config, "is_decoder", False):
        raise ConfigError([f"`model.path`: {named} is an encoder (model_type {model_type}), not a causal LM: its "
                           "attention sees every token unless its config sets is_decoder: true"], "model")
    try:
        with init_empty_weights():  # module names only: no memory, no weights read
            skeleton: torch.nn.Module = AutoModelForCausalLM.from_config(
                model_config, trust_remote_code=config.model.trust_remote_code)
    except ValueError as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError([f"`model.path`: {named} is not a causal LM ({reason})"], "model") from None
    problems = []
    if folder.is_dir():  # a hub id is read from the local cache by transformers itself
        pickles = sorted(folder.glob("pytorch_model*.bin"))
        if not ((folder / SAFE_WEIGHTS_NAME).is_file() or (folder / SAFE_WEIGHTS_INDEX_NAME).is_file() or pickles):
            problems.append(f"`model.path`: no weights in {named} (model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin)")
        elif not (folder / SAFE_WEIGHTS_NAME).is_file() and not (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
            # Pickled weights are accepted because transformers 5 reads them only with torch.load(weights_only=True)
            # (nothing here passes weights_only=False), which unpickles tensors and plain containers and refuses
            # any other object, so a pickle cannot run code. transformers refuses pickles on torch < 2.6 (CVE-2025-
            # 32434); both refusals are made here, once, instead of in every trial. map_location="meta" (and mmap
            # where the format allows) reads the pickle's structure, not its tensors.
            try:
                check_torch_load_is_safe()
            except ValueError:
                problems.append(f"`model.path`: {named} holds its weights only as a pickle (pytorch_model.bin), which "
                                f"transformers loads only with torch >= 2.6, but this is {torch.__version__}; upgrade "
                                "torch, or save the weights as safetensors")
                pickles = []
            for weights in pickles:
                try:
                    torch.load(weights, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(weights))
                except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
                    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: Please use|\n|$)", str(error))
                    reason = (found.group(1) if found else (str(error).strip().splitlines() or [""])[0])[:120]
                    problems.append(f"`model.path`: {weights.name} in {named} is not a plain tensor pickle; pickles are "
                                    f"only loaded with torch.load(weights_only=True), which refuses it ({reason})")
                    break
    # Positions past the model's own are out of its embedding table (learned positions: an index error in the
    # trial) or where it was never trained (rotary): neither trains what the user means. The name differs by model.
    model_limit = model_positions(model_config)
    if model_limit and model_limit[1] < config.data.max_length:
        key, positions = model_limit
        problems.append(f"`data.max_length`: {config.data.max_length} is more than the model's {positions} "
                        f"positions ({key} in its config); lower data.max_length to {positions} or less")
    targets: list[Any] = [config.lora.target_modules]  # the setting, and every one the search can pick
    choice = space.get("lora.target_modules")
    if isinstance(choice, od.CategoricalDistribution):
        targets.extend(choice.choices)
    target_problems = []
    for target in targets:
        try:
            resolve_target_modules(skeleton, target)
        except ConfigError as error:
            target_problems.extend(error.problems)
    problems.extend(sorted(set(target_problems)))
    if problems:
        raise ConfigError(problems, "model")
    return skeleton


def check_resources(config: SweepConfig) -> None:
    """A trial that asks for more than a local Ray has would wait forever: refuse it up front.

    On an existing cluster (`ray.address`) the driver checks after connecting instead.
    """
    if config.ray.address:
        return
    cpus, gpus = local_ray_resources(config)
    problems = []
    workers = config.resources.workers
    held = f"a trial's {workers} workers ask for" if workers > 1 else "a trial asks for"
    if config.resources.cpu * workers > cpus:
        problems.append(f"`resources.cpu`: {held} {config.resources.cpu * workers} CPUs but this machine's Ray has {cpus}")
    if config.resources.gpu * workers > gpus:
        problems.append(f"`resources.gpu`: {held} {config.resources.gpu * workers} GPUs but this machine's Ray has "
                        f"{gpus:g}")
    if problems:
        raise ConfigError(problems, "resources")


def check_output_dir(config: SweepConfig) -> None:
    existing = nearest_existing(config.sweep_dir)
    if not existing.is_dir():
        raise ConfigError([f"`output_dir`: {existing} is a file, so {config.sweep_dir} cannot be created"], "output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError([f"`output_dir`: {existing} is not writable, so {config.sweep_dir} cannot be created"], "output")


@dataclass(frozen=True)
class Checked:
    """What the checks found, before anything is written: `sweep run` goes on with it, `sweep plan` shows it."""

    space: dict[str, od.BaseDistribution]
    tokenizer: Any
    tokenized: TokenizedData
    skeleton: torch.nn.Module  # the model's modules on the meta device
    concurrent: int  # trials at once
    base_parameters: int
    adapter_parameters: int  # of the largest adapter the sweep can pick
    disk: dict[str, int]  # bytes, as `disk_needs` counts them


def preflight(config: SweepConfig, probe_storage: bool = True) -> Checked:
    """Every check, then the data tokenized in memory; nothing is written (but a storage probe, when asked).

    The model's own code (`trust_remote_code`) is imported only after every check that does not need the
    model passed: the config, search space, resources, output, storage, cluster address and the data files.
    """
    if config.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: the Python code in %s will run on this machine and in every "
                    "trial; use it only for a model whose code you trust", config.model.path)
    check_test_hooks()
    space = build_search_space(config)
    check_resources(config)
    check_placement(config)
    check_output_dir(config)
    if probe_storage:
        check_storage(config)
    else:
        open_storage(config)  # the URI opens; a plan writes nothing, so it does not probe
    check_cluster_address(config)
    check_trackers(config)  # installed, and a remote MLflow server answers
    # Every metric imports and returns floats on a sample answer (a user's own code, before any trial runs).
    reported = check_metrics(config.evaluation.metrics, reserved=RESERVED_KEYS)
    if config.search.metric not in (*OBJECTIVE_METRICS, *reported):
        raise ConfigError([f"`search.metric`: {config.search.metric!r} is neither a loss the trainable reports "
                           f"({', '.join(OBJECTIVE_METRICS)}) nor a metric evaluation.metrics reports "
                           f"({', '.join(reported)})"], "config")
    examples = load_samples(config.data, config.seed)
    skeleton = check_model(config, space)
    tokenizer = load_tokenizer(config)
    tokenized = tokenize_splits(config.data, tokenizer, config.seed, examples)
    if tokenized.format == "text" and config.generated_val_examples:
        why = (f"search.metric {config.search.metric} is scored on generated answers" if config.evaluation.val_examples
               is None else f"evaluation.val_examples {config.evaluation.val_examples} asks trials to answer")
        raise ConfigError([f"`data.format`: text data has no prompts to answer (every token is trained on), but {why}; "
                           "optimise eval_loss or eval_perplexity, or use prompt_completion data"], "config")
    concurrent = concurrent_trials(config)
    base_parameters = sum(p.numel() for p in skeleton.parameters())
    adapter_parameters = largest_adapter(config, space, skeleton)
    disk = disk_needs(config, adapter_parameters, base_parameters, concurrent)
    short_of_space = check_free_space(config, disk, concurrent)
    if short_of_space:
        log.warning(short_of_space)
    return Checked(space, tokenizer, tokenized, skeleton, concurrent, base_parameters, adapter_parameters, disk)
