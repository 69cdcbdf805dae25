import re

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from lora_sweep.config import ConfigError, LoraConfig
from lora_sweep.lora import linear_module_names, lora_settings, resolve_target_modules
from lora_sweep.models import load_base_model
from lora_sweep.config import load_config


@pytest.fixture(scope="module")
def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=32))


def matched(model, pattern):
    return [n for n in linear_module_names(model) if re.fullmatch(pattern, n)]


def test_llama_presets(raw_config, write_config):
    model = load_base_model(load_config(write_config(raw_config)))
    attention = {n.split(".")[-1] for n in matched(model, resolve_target_modules(model, "attention"))}
    mlp = {n.split(".")[-1] for n in matched(model, resolve_target_modules(model, "mlp"))}
    assert attention == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert mlp == {"gate_proj", "up_proj", "down_proj"}
    assert len(matched(model, resolve_target_modules(model, "all-linear"))) == 2 * 7
    assert not any("lm_head" in n for n in linear_module_names(model))


def test_gpt2_conv1d_presets_keep_attention_and_mlp_c_proj_apart(gpt2):
    attention = matched(gpt2, resolve_target_modules(gpt2, "attention"))
    mlp = matched(gpt2, resolve_target_modules(gpt2, "mlp"))
    assert attention == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    assert mlp == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


def test_unknown_module_names_list_the_real_ones(gpt2):
    with pytest.raises(ConfigError) as caught:
        resolve_target_modules(gpt2, ["q_proj"])
    assert "['q_proj'] not found" in caught.value.problems[0] and "c_attn" in caught.value.problems[0]


def test_lora_settings_alpha_is_a_multiple_of_rank(gpt2):
    settings = lora_settings(LoraConfig(rank=16, alpha_multiple=0.5, dropout=0.1, target_modules="attention"), gpt2)
    assert (settings.r, settings.lora_alpha, settings.lora_dropout) == (16, 8, 0.1)
