"""Where a trial's base model lives: the CPU, the GPU Ray assigned, several GPUs, or a 4-bit GPU copy.

Ray sets CUDA_VISIBLE_DEVICES for each trial, so the CUDA devices a trial sees are
the ones it was given. One GPU: the Trainer moves the model there. Two or more:
accelerate's `device_map="auto"` spreads the layers over them (a model too big for
one GPU), and the Trainer, seeing the model's `hf_device_map` span several
devices, trains it in place (naive model parallelism, one GPU busy at a time).
`model.quantization` loads the base in 4 bits with bitsandbytes (QLoRA), which
runs on CUDA only: a sweep without a GPU is refused before anything runs.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

import torch

from lora_sweep.config import ConfigError, SweepConfig
from lora_sweep.lora import torch_dtype

QLORA_INSTALL = "pip install 'lora-sweep[qlora]'"


def visible_gpus() -> int:
    """CUDA devices this process sees (in a trial: the ones Ray gave it)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_devices_for_trial(config: SweepConfig) -> int:
    """The CUDA devices this trial may use (0 when it asked for none, or where CUDA is missing). A data-parallel
    worker uses one: Ray Train shows each worker every GPU its node gives the trial's workers, and the Trainer
    trains on the one of its local rank."""
    if config.resources.gpu == 0:
        return 0
    return min(visible_gpus(), 1) if config.resources.workers > 1 else visible_gpus()


def trial_cuda_device() -> int:
    """The CUDA device this trial process trains on: its local rank's in a data-parallel worker (as the Trainer
    picks it), else the current one."""
    local_rank = os.environ.get("LOCAL_RANK")
    return int(local_rank) if local_rank is not None else torch.cuda.current_device()


def quantization_config(config: SweepConfig) -> Any:
    """QLoRA's 4-bit settings: NF4 (or FP4), double quantization, bf16 compute where the GPU has it."""
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.model.quantization,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def loading_kwargs(config: SweepConfig, spread_over_gpus: bool = False) -> dict[str, Any]:
    """`from_pretrained` arguments outside a trial: full precision, on the CPU or spread over this machine's GPUs."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(config.model.dtype), "trust_remote_code": config.model.trust_remote_code}
    if spread_over_gpus:
        kwargs["device_map"] = "auto"
    return kwargs


def trial_loading_kwargs(config: SweepConfig, cuda_devices: int) -> dict[str, Any]:
    """`from_pretrained` arguments for a trial's base model, given the CUDA devices the trial sees."""
    kwargs = loading_kwargs(config)
    quantized = config.model.quantization != "none"
    if quantized:
        if cuda_devices == 0:
            raise ConfigError([f"`model.quantization`: {config.model.quantization} (bitsandbytes 4-bit) needs a CUDA "
                               "GPU, but this trial sees none; set it to none to train the full-precision base"], "model")
        kwargs["quantization_config"] = quantization_config(config)
    if cuda_devices >= 2:
        kwargs["device_map"] = "auto"  # accelerate balances the layers over every GPU the trial holds
    elif quantized:
        kwargs["device_map"] = {"": trial_cuda_device()}  # bitsandbytes quantizes while loading onto the GPU
    return kwargs


def check_placement(config: SweepConfig) -> None:
    """Before anything runs: a 4-bit sweep needs bitsandbytes and, on a local Ray, a CUDA GPU here."""
    if config.model.quantization == "none":
        return
    problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"`model.quantization`: {config.model.quantization} needs the bitsandbytes package, which is "
                        f"not installed ({QLORA_INSTALL} on a CUDA machine)")
    if not config.ray.address and not torch.cuda.is_available():
        problems.append(f"`model.quantization`: {config.model.quantization} (bitsandbytes 4-bit) trains on CUDA GPUs "
                        "only, and this machine has none; set it to none to train the full-precision base")
    if problems:
        raise ConfigError(problems, "model")


def model_positions(model_config: Any) -> Optional[tuple[str, int]]:
    """(the config key, its value): how many tokens the model attends over, prompt and answer together, when its
    config says. The names differ by model; read as config.json writes them, not their aliases (GPT-2's
    n_positions is also max_position_embeddings in transformers)."""
    written = model_config.get_text_config().to_dict()
    key = next((k for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
                if k in written), None)
    positions = written.get(key)
    if key is not None and isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        return key, positions
    return None


def pick_device(resources_gpu: float) -> tuple[bool, bool, bool]:
    """(use_cpu, bf16, fp16): the GPU Ray assigned if there is one, bf16 where supported."""
    if resources_gpu > 0 and torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return False, bf16, not bf16
    return True, False, False
