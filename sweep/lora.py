"""LoRA on a base model: target-module presets resolved against the model's own layers.

Presets resolve to a regex of full module names (peft matches a string with
re.fullmatch), which stays exact where short names repeat across blocks
(GPT-2's `c_proj` is in both attention and MLP).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

import optuna.distributions as od
import peft
import torch
from torch import nn

from lora_sweep.config import ConfigError, LoraConfig, SweepConfig
from lora_sweep.search_space import apply_params

_ATTENTION_MARKERS = ("attn", "attention")
_NOT_TARGETS = ("lm_head", "embed_out", "output_layer", "score", "classifier")
_IN_A_BLOCK = re.compile(r"\.\d+\.")


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with its weight transposed.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer LoRA could adapt (output heads excluded)."""
    names = []
    for name, module in model.named_modules():
        if _is_linear(module) and not any(name.split(".")[-1] == head for head in _NOT_TARGETS):
            names.append(name)
    return names


def resolve_target_modules(model: nn.Module, target: str | list[str]) -> str | list[str]:
    """A preset -> an exact regex of module names; a list of short names is checked against the model."""
    names = linear_module_names(model)
    short_names = sorted({name.split(".")[-1] for name in names})
    if isinstance(target, list):
        missing = [t for t in target if t not in short_names]
        if missing:
            raise ConfigError(
                [f"`lora.target_modules`: {missing} not found in the model; its linear modules are {short_names}"],
                "model",
            )
        return target
    # Presets adapt the transformer blocks (numbered: `layers.3.`, `h.3.`): layers around them, such
    # as OPT-350m's project_in/project_out, are neither attention nor MLP.
    in_blocks = [n for n in names if _IN_A_BLOCK.search(n)] or names
    if target == "all-linear":
        chosen = in_blocks
    else:
        in_attention = [n for n in in_blocks if any(m in n.lower() for m in _ATTENTION_MARKERS)]
        chosen = in_attention if target == "attention" else [n for n in in_blocks if n not in in_attention]
    if not chosen:
        raise ConfigError(
            [f"`lora.target_modules`: preset {target!r} matches no layer of this model; its linear modules are {short_names}"],
            "model",
        )
    return "^(?:" + "|".join(re.escape(n) for n in chosen) + ")$"


def targeted_module_names(model: nn.Module, resolved: str | Iterable[str]) -> list[str]:
    """The linear layers a resolved `target_modules` (a regex of full names, or short names) adapts."""
    if isinstance(resolved, str):
        return [n for n in linear_module_names(model) if re.fullmatch(resolved, n) is not None]
    short_names = set(resolved)  # peft's LoraConfig keeps a list of names as a set
    return [n for n in linear_module_names(model) if n.split(".")[-1] in short_names]


def lora_settings(settings: LoraConfig, model: nn.Module) -> peft.LoraConfig:
    return peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=settings.rank,
        lora_alpha=settings.alpha_multiple * settings.rank,  # type: ignore[arg-type]  # peft divides it by r: a float works
        lora_dropout=settings.dropout,
        target_modules=resolve_target_modules(model, settings.target_modules),
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        # "pissa" is PiSSA's exact SVD (not the randomised `pissa_niter_*`): a restarted trial recomputes
        # the same residual base weights before it loads its checkpoint's adapter.
        init_lora_weights=True if settings.init == "default" else settings.init,
    )


def torch_dtype(name: str) -> Any:
    if name == "auto":
        return "auto"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _space_values(distribution: Optional[od.BaseDistribution], default: Any) -> list[Any]:
    if isinstance(distribution, od.CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, od.IntDistribution):
        return [distribution.low, distribution.high]
    return [default]


def largest_adapter(config: SweepConfig, space: dict[str, od.BaseDistribution], skeleton: torch.nn.Module) -> int:
    """LoRA parameters of the largest adapter the sweep can pick: rank x (in + out) per adapted layer."""
    modules = dict(skeleton.named_modules())
    largest = 0
    for rank in _space_values(space.get("lora.rank"), config.lora.rank):
        for target in _space_values(space.get("lora.target_modules"), config.lora.target_modules):
            lora = apply_params(config, {"lora.rank": rank, "lora.target_modules": target}).lora
            resolved = resolve_target_modules(skeleton, lora.target_modules)
            names = targeted_module_names(skeleton, resolved)
            total = 0
            for name in names:
                weight = modules[name].weight
                total += rank * (weight.shape[0] + weight.shape[1])
            largest = max(largest, total)
    return largest
