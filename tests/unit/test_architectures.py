"""Target-module presets on every common causal-LM family, each a tiny model built from its config.

For each family: `attention` and `mlp` pick exactly the family's own layers inside the
transformer blocks, `all-linear` is their union, and peft attaches LoRA with the resolved
pattern so that a training step runs and changes only LoRA weights.
"""

import re

import peft
import pytest
import torch
from transformers import (
    FalconConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    AutoModelForCausalLM,
)

from lora_sweep.config import ConfigError, LoraConfig
from lora_sweep.lora import linear_module_names, lora_settings, resolve_target_modules

DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
LLAMA_LIKE = ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"})

FAMILIES = {
    "llama": (LlamaConfig(**DECODER, num_key_value_heads=2), *LLAMA_LIKE),
    "mistral": (MistralConfig(**DECODER, num_key_value_heads=2), *LLAMA_LIKE),
    "qwen2": (Qwen2Config(**DECODER, num_key_value_heads=2), *LLAMA_LIKE),
    "gemma": (GemmaConfig(**DECODER, num_key_value_heads=2, head_dim=8), *LLAMA_LIKE),
    "phi3": (Phi3Config(**DECODER, num_key_value_heads=4, pad_token_id=0), {"qkv_proj", "o_proj"},
             {"gate_up_proj", "down_proj"}),
    "gpt2": (GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64), {"attn.c_attn", "attn.c_proj"},
             {"mlp.c_fc", "mlp.c_proj"}),
    "gpt_neox": (GPTNeoXConfig(**DECODER), {"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
    "opt": (OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                      word_embed_proj_dim=32), {"q_proj", "k_proj", "v_proj", "out_proj"}, {"fc1", "fc2"}),
    # OPT-350m's shape: embeddings narrower than the model, with project_in/project_out around the blocks.
    "opt_projected": (OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                word_embed_proj_dim=16), {"q_proj", "k_proj", "v_proj", "out_proj"}, {"fc1", "fc2"}),
    "falcon": (FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128),
               {"query_key_value", "dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
}


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[family][0])


def picked(model: torch.nn.Module, preset: str) -> list[str]:
    pattern = resolve_target_modules(model, preset)
    return [n for n in linear_module_names(model) if re.fullmatch(pattern, n)]


def ends(names: list[str], family: str) -> set[str]:
    """Short names; GPT-2 needs the parent too (its attention and MLP both have a c_proj)."""
    depth = 2 if family == "gpt2" else 1
    return {".".join(n.split(".")[-depth:]) for n in names}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_presets_pick_the_familys_own_layers(family):
    model = build(family)
    _, attention, mlp = FAMILIES[family]
    layers = FAMILIES[family][0].num_hidden_layers if hasattr(FAMILIES[family][0], "num_hidden_layers") else 2
    assert ends(picked(model, "attention"), family) == attention
    assert ends(picked(model, "mlp"), family) == mlp
    everything = picked(model, "all-linear")
    assert sorted(everything) == sorted(picked(model, "attention") + picked(model, "mlp"))
    assert len(everything) == layers * (len(attention) + len(mlp))  # every block, nothing outside the blocks


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_on_every_preset_trains_only_the_adapter(family):
    model = build(family)
    settings = lora_settings(LoraConfig(rank=4, target_modules="all-linear", dropout=0.0), model)
    lora_model = peft.get_peft_model(model, settings)
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12))
    for _ in range(2):  # LoRA's B starts at zero: A moves at the first step only after B has
        loss = lora_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in lora_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_an_unknown_architecture_gets_its_linear_modules_listed():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"mix": torch.nn.Linear(8, 8)}) for _ in range(2))

    with pytest.raises(ConfigError) as caught:
        resolve_target_modules(Odd(), "attention")
    assert "preset 'attention' matches no layer of this model; its linear modules are ['mix']" in caught.value.problems[0]
