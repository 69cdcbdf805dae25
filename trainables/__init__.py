"""The trainables shipped with lora-sweep, by the name the config's `trainable` gives them (see lora_sweep.recipe)."""

from lora_sweep.recipe import Recipe
from lora_sweep.trainables.lora_causal_lm import LoraCausalLM

TRAINABLES: dict[str, type[Recipe]] = {recipe.name: recipe for recipe in (LoraCausalLM,)}
