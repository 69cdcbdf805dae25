"""Bad search spaces and bad models are refused by `sweep run` and `sweep plan` before anything runs or is
written: exit 2, one to three `error:` lines naming the field, the value and the rule, no traceback.

Every model here is built in the test from a transformers config class with tiny sizes: nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_refused, listing, refused_case
from lora_sweep.cli import app


def _space(raw: dict, name: str, **spec) -> None:
    raw["search"].update(space=None, parameters={name: spec})


def _copy_model(raw: dict, tmp: Path, name: str, leave_out: tuple[str, ...] = ()) -> Path:
    """A copy of the tiny Llama without the named files; the config then points at it."""
    target = tmp / name
    shutil.copytree(raw["model"]["path"], target, ignore=shutil.ignore_patterns(*leave_out))
    raw["model"]["path"] = str(target)
    return target


def _without_tokenizer(raw: dict, tmp: Path) -> None:
    _copy_model(raw, tmp, "no-tokenizer", leave_out=("tokenizer*", "special_tokens_map.json"))


def _broken_tokenizer(raw: dict, tmp: Path) -> None:
    folder = _copy_model(raw, tmp, "broken-tokenizer")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nothing"}}')


def _tokenizer_without(raw: dict, tmp: Path, *tokens: str) -> None:
    folder = _copy_model(raw, tmp, "no-" + "-".join(tokens))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    for token in tokens:
        settings.pop(f"{token}_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


def _pickled_weights(raw: dict, tmp: Path, extra: object = None) -> Path:
    """The tiny Llama's weights as a pickle (pytorch_model.bin) only, optionally with a non-tensor object in it."""
    from safetensors.torch import load_file

    state = load_file(Path(raw["model"]["path"]) / "model.safetensors")
    if extra is not None:
        state["extra"] = extra
    folder = _copy_model(raw, tmp, "pickled", leave_out=("*.safetensors",))
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def _encoder(raw: dict, tmp: Path, kind: str) -> None:
    """A tiny encoder (BERT, RoBERTa) or encoder-decoder (BART) saved with its weights; the model check refuses it
    before any tokenizer is looked for."""
    import transformers

    sizes = dict(vocab_size=300, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                 max_position_embeddings=512)
    if kind == "bart":
        config = transformers.BartConfig(vocab_size=300, d_model=8, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=8,
                                         decoder_ffn_dim=8, max_position_embeddings=512)
        model = transformers.BartForConditionalGeneration(config)
    elif kind == "roberta":
        model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**sizes))
    else:
        model = transformers.BertForMaskedLM(transformers.BertConfig(**sizes))
    folder = tmp / kind
    model.save_pretrained(folder)
    raw["model"]["path"] = str(folder)


def _tiny_gpt2(raw: dict, tmp: Path) -> None:
    """A GPT-2 with 64 learned positions: `n_positions`, not `max_position_embeddings`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer_from = Path(raw["model"]["path"])
    folder = tmp / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=8, n_layer=1, n_head=2, n_positions=64)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    raw["model"]["path"] = str(folder)


# (what to change, text the output must contain)
CASES = {
    # search spaces
    "step of 0": (lambda raw, tmp: _space(raw, "lora.dropout", type="uniform", low=0.0, high=0.1, step=0),
                  "`lora.dropout`.step: must be a finite number > 0, but got 0"),
    "negative step": (lambda raw, tmp: _space(raw, "lora.rank", type="int", low=4, high=16, step=-4),
                      "`lora.rank`.step: must be a finite number > 0, but got -4"),
    "step a string": (lambda raw, tmp: _space(raw, "lora.dropout", type="uniform", low=0.0, high=0.1, step="0.01"),
                      "`lora.dropout`.step: must be a finite number > 0, but got '0.01'"),
    "step a bool": (lambda raw, tmp: _space(raw, "lora.rank", type="int", low=4, high=16, step=True),
                    "`lora.rank`.step: must be a finite number > 0, but got True"),
    "fractional int step": (lambda raw, tmp: _space(raw, "lora.rank", type="int", low=4, high=16, step=1.5),
                            "`lora.rank`.step: an int distribution needs a whole-number step, but got 1.5"),
    "float step not dividing the range": (
        lambda raw, tmp: _space(raw, "lora.dropout", type="uniform", low=0.0, high=0.1, step=0.03),
        "`lora.dropout`: (high - low) = 0.1 is not a multiple of step 0.03"),
    "int step not dividing the range": (
        lambda raw, tmp: _space(raw, "lora.rank", type="int", low=1, high=10, step=4),
        "`lora.rank`: (high - low) = 9 is not a multiple of step 4"),
    "step on a loguniform": (
        lambda raw, tmp: _space(raw, "training.learning_rate", type="loguniform", low=1e-5, high=1e-3, step=1e-5),
        "`training.learning_rate`.step: a loguniform distribution takes no step"),
    "fractional int bounds": (lambda raw, tmp: _space(raw, "lora.rank", type="int", low=1.5, high=16),
                              "`lora.rank`.low: an int distribution needs whole-number bounds, but got 1.5"),
    "infinite high": (lambda raw, tmp: _space(raw, "lora.dropout", type="uniform", low=0.0, high=float("inf")),
                      "`lora.dropout`.high: must be a finite number, but got inf"),
    "NaN low": (lambda raw, tmp: _space(raw, "training.learning_rate", type="loguniform", low=float("nan"), high=1e-3),
                "`training.learning_rate`.low: must be a finite number, but got nan"),
    "infinite int bound": (lambda raw, tmp: _space(raw, "lora.rank", type="int", low=1, high=float("inf")),
                           "`lora.rank`.high: must be a finite number, but got inf"),
    "bool bounds": (lambda raw, tmp: _space(raw, "lora.dropout", type="uniform", low=False, high=0.1),
                    "`lora.dropout`.low: must be a number, but got False"),
    "a long value is shortened": (lambda raw, tmp: _space(raw, "lora.dropout", type="uniform", low=0.0, high=0.1,
                                                          step="x" * 500),
                                  "must be a finite number > 0, but got 'xxxxxxxxxx"),
    # models
    "no tokenizer files": (_without_tokenizer, "no tokenizer in"),
    "a tokenizer that does not load": (_broken_tokenizer, "`model.path`: cannot load the tokenizer in"),
    "tokenizer without EOS or pad": (lambda raw, tmp: _tokenizer_without(raw, tmp, "eos", "pad"),
                                     "has neither an EOS nor a pad token; training needs an EOS to end responses"),
    "tokenizer without EOS": (lambda raw, tmp: _tokenizer_without(raw, tmp, "eos"),
                              "has no EOS token; training needs an EOS to end responses"),
    "an encoder (BERT)": (lambda raw, tmp: _encoder(raw, tmp, "bert"),
                          "is an encoder (model_type bert), not a causal LM: its attention sees every token"),
    "an encoder (RoBERTa)": (lambda raw, tmp: _encoder(raw, tmp, "roberta"),
                             "is an encoder (model_type roberta), not a causal LM"),
    "an encoder-decoder (BART)": (lambda raw, tmp: _encoder(raw, tmp, "bart"),
                                  "is an encoder-decoder (model_type bart), not a causal LM"),
    "no weights": (lambda raw, tmp: _copy_model(raw, tmp, "no-weights", leave_out=("*.safetensors",)),
                   "`model.path`: no weights in"),
    "a pickle holding more than tensors": (
        lambda raw, tmp: _pickled_weights(raw, tmp, extra=Path("not a tensor")),
        "is not a plain tensor pickle; pickles are only loaded with torch.load(weights_only=True)"),
    "max_length beyond max_position_embeddings": (
        lambda raw, tmp: raw["data"].update(max_length=1024),
        "`data.max_length`: 1024 is more than the model's 512 positions (max_position_embeddings in its config)"),
    "max_length beyond n_positions": (
        _tiny_gpt2, "`data.max_length`: 160 is more than the model's 64 positions (n_positions in its config)"),
}


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_space_or_model_is_refused_and_nothing_is_written(case, command, raw_config, write_config, tmp_path):
    result = refused_case(command, *CASES[case], raw_config, write_config, tmp_path)
    assert str(tmp_path / "sweep.yaml") in result.output


def test_pickled_weights_are_accepted_and_load_safely(raw_config, write_config, tmp_path):
    """transformers 5 reads pytorch_model.bin with torch.load(weights_only=True): a plain tensor pickle passes."""
    from transformers import AutoModelForCausalLM

    folder = _pickled_weights(raw_config, tmp_path)
    result = CliRunner().invoke(app, ["plan", str(write_config(raw_config))])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_pickled_weights_on_a_torch_transformers_will_not_unpickle(raw_config, write_config, tmp_path, monkeypatch):
    """Below torch 2.6 transformers refuses every pickle (CVE-2025-32434): refused before the sweep, not per trial."""
    from lora_sweep import preflight

    def too_old() -> None:
        raise ValueError("upgrade torch to at least v2.6")

    monkeypatch.setattr(preflight, "check_torch_load_is_safe", too_old)  # transformers' own check, as imported there
    _pickled_weights(raw_config, tmp_path)
    config_path = write_config(raw_config)
    before = listing(tmp_path)
    result = CliRunner().invoke(app, ["run", str(config_path)])
    assert_refused(result, "holds its weights only as a pickle (pytorch_model.bin), which transformers loads only "
                           "with torch >= 2.6", before, tmp_path)


def test_an_encoder_configured_as_a_decoder_is_a_causal_lm(raw_config, write_config, tmp_path):
    """The encoder rule follows transformers: with `is_decoder: true` BERT's attention is causal, so it may train."""
    from transformers import BertConfig, BertLMHeadModel

    folder = tmp_path / "bert-decoder"
    BertLMHeadModel(BertConfig(vocab_size=300, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=8, is_decoder=True)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(raw_config["model"]["path"]) / name, folder / name)
    raw_config["model"]["path"] = str(folder)
    result = CliRunner().invoke(app, ["plan", str(write_config(raw_config))])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("spec, shown", [
    ({"type": "uniform", "low": 0.0, "high": 0.1, "step": 0.01}, "uniform in [0, 0.1], step 0.01"),
    ({"type": "int", "low": 4.0, "high": 16, "step": 4}, "integer in [4, 16], step 4"),
])
def test_steps_that_divide_the_range_are_kept(spec, shown, raw_config):
    """Decimal arithmetic: 0.1 - 0.0 is a multiple of 0.01 although it is not in floating point."""
    from lora_sweep.config import validate_config
    from lora_sweep.search_space import build_search_space, describe

    name = "lora.dropout" if spec["type"] == "uniform" else "lora.rank"
    _space(raw_config, name, **spec)
    assert describe(build_search_space(validate_config(raw_config))[name]) == shown
