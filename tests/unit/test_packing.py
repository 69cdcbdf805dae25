"""Packing (`data.packing`): short training examples share a sequence without seeing each other."""

import torch
from transformers import AutoModelForCausalLM

from lora_sweep.config import DataConfig
from lora_sweep.data import IGNORE_INDEX, PaddingCollator, pack_rows, tokenize_splits
from lora_sweep.templates import Example, render_default
from lora_sweep.data import tokenize_example
from lora_sweep.testing.tiny_model import build_byte_tokenizer

from conftest import ASSETS


def rows(lengths):
    tokenizer = build_byte_tokenizer()
    out = []
    for i, length in enumerate(lengths):
        example = Example(instruction=f"Repeat {i}.", response="x" * length)
        out.append(tokenize_example(example, render_default, tokenizer, max_length=4096))
    return out


def test_every_example_is_packed_once_into_rows_that_fit_with_positions_restarting():
    unpacked = rows([3, 40, 7, 90, 12, 60, 1, 25])
    packed = pack_rows(unpacked, max_length=150)
    assert all(len(row["input_ids"]) <= 150 for row in packed)
    assert len(packed) < len(unpacked) and sum(row["examples"] for row in packed) == len(unpacked)
    pieces = []
    for row in packed:
        starts = [i for i, position in enumerate(row["position_ids"]) if position == 0]
        bounds = starts + [len(row["input_ids"])]
        for start, end in zip(bounds, bounds[1:], strict=False):
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start] == IGNORE_INDEX  # never the target of the example before it
            pieces.append(row["input_ids"][start:end])
    assert sorted(map(tuple, pieces)) == sorted(tuple(row["input_ids"]) for row in unpacked)


def test_the_collator_gives_packed_rows_no_mask_and_padding_its_own_positions():
    packed = pack_rows(rows([3, 40, 7, 90]), max_length=100)
    batch = PaddingCollator(pad_token_id=2)(packed)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    shortest = min(range(len(packed)), key=lambda i: len(packed[i]["input_ids"]))
    length = len(packed[shortest]["input_ids"])
    tail = batch["position_ids"][shortest, length:]
    assert tail.tolist() == list(range(len(tail))) and len(tail) > 0
    assert (batch["labels"][shortest, length:] == IGNORE_INDEX).all()


def per_example_losses(model, input_ids, labels, position_ids=None, attention_mask=None):
    """Each example's summed cross-entropy and its target count, split at the position restarts."""
    # No KV cache, as the trainable trains a packed sweep (transformers isolates packed examples only without one).
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                   use_cache=False).logits
    losses = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX,
                                               reduction="none")
    return losses


def test_each_examples_loss_is_the_same_packed_and_unpacked(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    unpacked = rows([5, 30, 12, 44, 2, 17])
    packed = pack_rows(unpacked, max_length=256)
    assert len(packed) < len(unpacked)
    alone = {}
    with torch.no_grad():
        for row in unpacked:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            losses = per_example_losses(model, ids, labels, attention_mask=torch.ones_like(ids))
            alone[tuple(row["input_ids"])] = losses.sum().item() / int((labels[0, 1:] != IGNORE_INDEX).sum())
        compared = 0
        for row in packed:
            batch = PaddingCollator(pad_token_id=2)([row])
            losses = per_example_losses(model, batch["input_ids"], batch["labels"], batch["position_ids"])
            positions = row["position_ids"]
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            for start, end in zip(starts, starts[1:], strict=False):
                # targets start+1 .. end-1 belong to this example: the losses at start .. end-2
                targets = torch.tensor(row["labels"][start + 1:end])
                loss = losses[start:end - 1].sum().item() / int((targets != IGNORE_INDEX).sum())
                assert abs(loss - alone[tuple(row["input_ids"][start:end])]) < 1e-4
                compared += 1
    assert compared == len(unpacked)


def test_packing_packs_the_training_split_only_and_changes_the_data_hash():
    tokenizer = build_byte_tokenizer()
    data = DataConfig(files=[str(ASSETS / "instructions.jsonl")], max_length=400)
    plain = tokenize_splits(data, tokenizer, 0)
    packed = tokenize_splits(data.model_copy(update={"packing": True}), tokenizer, 0)
    assert packed.data_hash != plain.data_hash and packed.counts == plain.counts
    assert len(packed.records["train"]) < len(plain.records["train"])
    assert sum(row["examples"] for row in packed.records["train"]) == plain.counts["train"]
    assert packed.records["val"] == plain.records["val"] and packed.records["test"] == plain.records["test"]


def test_a_packed_trial_trains_on_packed_batches_without_a_kv_cache(raw_config, write_config, tmp_path, monkeypatch):
    import math

    from lora_sweep import models
    from lora_sweep.config import load_config
    from lora_sweep.data import prepare_data
    from lora_sweep.recipe import ListReporter, run_trial

    raw_config["data"]["packing"] = True
    config = load_config(write_config(raw_config))
    data = prepare_data(config.data, models.load_tokenizer(config), config.seed, tmp_path / "data")
    seen = []
    collate = PaddingCollator.__call__

    def spy(self, features):
        batch = collate(self, features)
        seen.append(set(batch))
        return batch

    monkeypatch.setattr(PaddingCollator, "__call__", spy)
    models._BASE_MODELS.clear()
    reporter = ListReporter()
    run_trial({}, config.model_dump(), str(data.path), reporter)
    assert [r["step"] for r in reporter.reports] == [3, 6] and all(math.isfinite(r["eval_loss"]) for r in reporter.reports)
    assert {"input_ids", "labels", "position_ids"} in seen  # training batches: packed
    assert {"input_ids", "attention_mask", "labels"} in seen  # evaluation batches: as they are
    (kept,) = models._BASE_MODELS.values()
    assert kept.config.use_cache is False
