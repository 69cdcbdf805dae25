"""Final evaluation on the held-out test split: loss, perplexity, exact match of greedy completions.

Loss is token-weighted over response tokens (the Trainer's eval loss averages
per batch, which skews perplexity when batches differ in length).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from datasets import Dataset

from lora_sweep.data import IGNORE_INDEX, MODEL_COLUMNS, PaddingCollator, prompt_token_ids
from lora_sweep.metrics import compute


@dataclass
class EvalMetrics:
    loss: float
    perplexity: float
    exact_match: Optional[float]  # None: nothing was answered (text data has no prompts)
    examples: int
    response_tokens: int
    samples: list[dict[str, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # `evaluation.metrics` of the answers, by name
    # Every answer and its reference, for the paired bootstrap of tuned against base (not written to files).
    completions: list[str] = field(default_factory=list, repr=False)
    references: list[str] = field(default_factory=list, repr=False)

    def as_json(self) -> dict[str, Any]:
        """What final_metrics.json keeps: everything but the answers themselves."""
        return {k: v for k, v in asdict(self).items() if k not in ("completions", "references")}


def shown_match(exact_match: Optional[float]) -> str:
    """Exact match as tables and messages show it: `n/a` where nothing was answered (text data)."""
    return "n/a" if exact_match is None else f"{exact_match:.3f}"


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def response_loss(model: Any, tokenizer: Any, dataset: Dataset, batch_size: int) -> tuple[float, int]:
    collator = PaddingCollator.for_tokenizer(tokenizer)
    rows = dataset.select_columns(MODEL_COLUMNS)
    total, tokens = 0.0, 0
    device = model_device(model)
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shifted_logits, shifted_labels = logits[:, :-1], batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        ).item()
        tokens += int((shifted_labels != IGNORE_INDEX).sum())
    return total / max(tokens, 1), tokens


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Where an answer ends: the tokenizer's EOS, the model's own (its generation config may list several), and
    the chat template's end-of-turn token, which ends an assistant turn in training and need not be the EOS
    (ChatML's <|im_end|> beside a base model's <|endoftext|>)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063answer\u2063"  # text no template writes: what follows it closes the assistant turn
        try:
            rendered = str(tokenizer.apply_chat_template(
                [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}], tokenize=False))
        except Exception:  # noqa: BLE001 - a template that needs other turns: EOS alone, as before
            rendered = ""
        after = rendered.partition(marker)[2]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        following = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if following and following[0] in special:
            ids.append(following[0])
    return sorted({int(i) for i in ids if isinstance(i, int)})


@torch.no_grad()
def greedy_completions(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy decoding of each prompt (token ids, as trained), left-padded in batches."""
    device = model_device(model)
    pad = tokenizer.pad_token_id
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        generated = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=stop_token_ids(model, tokenizer),
        )
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs


def evaluate_model(
    model: Any, tokenizer: Any, test_set: Dataset, max_new_tokens: int, batch_size: int,
    max_examples: Optional[int] = None, keep_samples: int = 5, metrics: Sequence[str] = (), answers: bool = True,
) -> EvalMetrics:
    """Loss and perplexity over the test split's trained tokens; with `answers`, greedy answers to (the first
    `max_examples` of) its prompts and their task metrics. Text data has no prompts: answering the BOS token
    alone would score a continuation of nothing against a whole document."""
    model.eval()
    loss, tokens = response_loss(model, tokenizer, test_set, batch_size)
    if not answers:
        return EvalMetrics(loss=loss, perplexity=math.exp(min(loss, 50.0)), exact_match=None,
                           examples=len(test_set), response_tokens=tokens)
    subset = test_set if max_examples is None else test_set.select(range(min(max_examples, len(test_set))))
    prompts = prompt_token_ids(subset)
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    references = [r.strip() for r in subset["response"]]
    matches = sum(c == r for c, r in zip(completions, references, strict=True))
    samples = [
        {"prompt": p, "reference": r, "completion": c}
        for p, r, c in list(zip(subset["prompt"], references, completions, strict=True))[:keep_samples]
    ]
    return EvalMetrics(
        loss=loss, perplexity=math.exp(min(loss, 50.0)), exact_match=matches / max(len(references), 1),
        examples=len(references), response_tokens=tokens, samples=samples,
        metrics=compute(list(metrics), completions, references) if metrics else {},
        completions=completions, references=references,
    )
