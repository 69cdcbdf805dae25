"""Where a trial's base model goes: one device, several GPUs, or 4 bits (QLoRA). Checked on a CPU machine:
the loading arguments, the refusals, and the accelerate/Trainer behaviour the multi-GPU path relies on."""

import pytest
import torch
from accelerate import infer_auto_device_map
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from typer.testing import CliRunner

from lora_sweep.cli import app
from lora_sweep.config import ConfigError, load_config
from lora_sweep.placement import check_placement, trial_loading_kwargs


def config_with(raw_config, write_config, **model):
    raw_config["model"].update(model)
    raw_config["resources"] = {"cpu": 1, "gpu": 1}
    return load_config(write_config(raw_config))


def test_one_device_loads_plainly_and_several_gpus_spread_the_model(raw_config, write_config):
    config = config_with(raw_config, write_config)
    assert trial_loading_kwargs(config, cuda_devices=0) == {"dtype": torch.float32, "trust_remote_code": False}
    assert "device_map" not in trial_loading_kwargs(config, cuda_devices=1)  # the Trainer moves it to its GPU
    assert trial_loading_kwargs(config, cuda_devices=2)["device_map"] == "auto"


def test_qlora_loads_nf4_with_double_quantization_on_the_trials_gpu(raw_config, write_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    config = config_with(raw_config, write_config, quantization="nf4")
    kwargs = trial_loading_kwargs(config, cuda_devices=1)
    quantization = kwargs["quantization_config"]
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_use_double_quant
    assert kwargs["device_map"] == {"": 0}
    assert trial_loading_kwargs(config, cuda_devices=4)["device_map"] == "auto"
    with pytest.raises(ConfigError, match=r"`model.quantization`: nf4 \(bitsandbytes 4-bit\) needs a CUDA GPU, but this trial sees none"):
        trial_loading_kwargs(config, cuda_devices=0)


def test_qlora_without_a_gpu_or_with_a_rewriting_init_is_refused_by_the_config(raw_config, write_config):
    raw_config["model"]["quantization"] = "fp4"
    with pytest.raises(ConfigError, match=r"model.quantization fp4 \(bitsandbytes 4-bit\) trains on CUDA GPUs only, "
                                          r"but resources.gpu is 0"):
        load_config(write_config(raw_config))
    raw_config["resources"] = {"gpu": 1}
    raw_config["lora"] = {"init": "pissa"}
    with pytest.raises(ConfigError, match=r"lora.init pissa rewrites the base weights"):
        load_config(write_config(raw_config))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_on_this_cpu_machine_is_refused_before_anything_runs(raw_config, write_config, tmp_path):
    config = config_with(raw_config, write_config, quantization="nf4")
    with pytest.raises(ConfigError) as caught:
        check_placement(config)
    assert any("this machine has none" in p for p in caught.value.problems)
    raw_config["ray"] = {"num_cpus": 2, "num_gpus": 1}
    result = CliRunner().invoke(app, ["run", str(write_config(raw_config))])
    assert result.exit_code == 2 and "`model.quantization`: nf4 (bitsandbytes 4-bit) trains on CUDA GPUs only" in result.output
    assert not (tmp_path / "results").exists()


def test_a_model_too_big_for_one_gpu_is_mapped_across_two(tiny_model_dir):
    """What `device_map="auto"` does with two GPUs of the trial: layers on both, none left out."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(model, max_memory={0: int(size * 0.8), 1: int(size * 0.8)},
                                       no_split_module_classes=model._no_split_modules)
    assert set(device_map.values()) == {0, 1}


def test_the_trainer_trains_a_model_spread_over_gpus_in_place(tiny_model_dir, tmp_path):
    """The Trainer sees an `hf_device_map` spanning two GPUs as model parallel: it moves nothing, wraps nothing."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
                           "lm_head": 1}
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    assert trainer.is_model_parallel and not trainer.place_model_on_device
