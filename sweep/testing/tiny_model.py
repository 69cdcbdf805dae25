"""Tiny causal LMs built locally from a config, for the demo, the benchmark tasks and the tests.

Nothing is downloaded: the tokenizer is byte-level (every byte is a token, no
merges) and the weights are a seeded random initialisation, optionally pretrained
here for a few minutes (`pretrain`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with BOS added to every sequence; ids 0..2 are <s>, </s>, <pad>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_llama(
    out_dir: str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised Llama causal LM and its tokenizer to out_dir (safetensors)."""
    out_dir = Path(out_dir)
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return save_initialised_model(LlamaForCausalLM, config, tokenizer, out_dir, seed)


def save_initialised_model(model_class: type[PreTrainedModel], config: PretrainedConfig,
                           tokenizer: PreTrainedTokenizerFast, out_dir: str | Path, seed: int) -> Path:
    """A seeded random initialisation of `model_class(config)`, written with its tokenizer (safetensors)."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pretrain(model_dir: Path, sample_text: Callable[[random.Random], str], steps: int, seed: int,
             max_length: Optional[int] = None, clip_norm: Optional[float] = None, log_every: int = 100) -> None:
    """Full training of a tiny model on texts from `sample_text` (batches of 32, AdamW at 3e-3 decaying
    linearly to 0): a one-off asset build, not a trial. `max_length` truncates, `clip_norm` clips gradients."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    for step in range(steps):
        batch = tokenizer([sample_text(rng) for _ in range(32)], return_tensors="pt", padding=True,
                          truncation=max_length is not None, max_length=max_length)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % log_every == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(model_dir, safe_serialization=True)
