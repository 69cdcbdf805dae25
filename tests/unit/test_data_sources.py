"""Data sources (`data.dataset`): a folder written by save_to_disk, a local folder or builder through
`datasets.load_dataset`, the dataset's own splits or `data.split`, and the errors a user meets (a split that
is not there, a hub id that is not in the cache while offline). Nothing here touches the network."""

import json
import os
import subprocess
import sys

import datasets
import pytest
import yaml
from datasets import Dataset, DatasetDict

from lora_sweep.config import ConfigError, DataConfig, load_config
from lora_sweep.data import load_samples, tokenize_splits
from lora_sweep.templates import Conversation, Example


def conversations(start: int, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(start, start + n)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """load_dataset writes its Arrow cache under the test's folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_a_saved_dataset_with_its_own_three_splits_is_used_as_it_is(tmp_path):
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(conversations(0, 20)), "validation": Dataset.from_list(conversations(20, 5)),
                 "test": Dataset.from_list(conversations(25, 4))}).save_to_disk(str(folder))
    loaded = load_samples(DataConfig(dataset={"path": str(folder)}), seed=0)
    assert loaded.format == "messages"
    assert {split: len(samples) for split, samples in loaded.splits.items()} == {"train": 20, "val": 5, "test": 4}
    assert all(isinstance(s, Conversation) for s in loaded.splits["test"])
    assert loaded.splits["test"][0].messages[0].content == "What is 25 + 1?"  # the dataset's own test rows


def test_one_saved_split_is_divided_by_data_split(tmp_path):
    folder = tmp_path / "saved"
    Dataset.from_list(conversations(0, 40)).save_to_disk(str(folder))  # a Dataset, not a DatasetDict
    loaded = load_samples(DataConfig(dataset={"path": str(folder)}, split={"train": 0.5, "val": 0.25, "test": 0.25}),
                          seed=0)
    assert {split: len(samples) for split, samples in loaded.splits.items()} == {"train": 20, "val": 10, "test": 10}


def test_a_dataset_with_train_and_test_only_keeps_its_test_split_and_takes_validation_out_of_train(tmp_path):
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(conversations(0, 40)),
                 "test": Dataset.from_list(conversations(40, 6))}).save_to_disk(str(folder))
    loaded = load_samples(DataConfig(dataset={"path": str(folder)}, split={"train": 0.6, "val": 0.2, "test": 0.2}),
                          seed=0)
    # val: 0.2 / (0.6 + 0.2) of train's 40 rows; the test split is the dataset's own six.
    assert {split: len(samples) for split, samples in loaded.splits.items()} == {"train": 30, "val": 10, "test": 6}
    assert sorted(s.messages[0].content for s in loaded.splits["test"]) == sorted(
        f"What is {i} + 1?" for i in range(40, 46))


def test_files_that_do_not_share_one_schema_are_a_clear_error(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    (folder / "more.jsonl").write_text(json.dumps({"prompt": "a", "completion": {"x": 1}, "extra": 2}) + "\n")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                      "    path: '*.jsonl'\n---\n")
    with pytest.raises(ConfigError, match=r"`data.dataset.path`: cannot load .*repo"):
        load_samples(DataConfig(dataset={"path": str(folder)}), seed=0)


def test_load_dataset_reads_a_local_folder_of_files_by_their_split_names(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    for name, rows in (("train", conversations(0, 12)), ("validation", conversations(12, 3)), ("test", conversations(15, 3))):
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = load_samples(DataConfig(dataset={"path": str(folder)}), seed=0)
    assert {split: len(samples) for split, samples in loaded.splits.items()} == {"train": 12, "val": 3, "test": 3}


def test_a_builder_with_data_files_relative_to_the_config_and_splits_named_by_the_user(tmp_path, raw_config):
    for name, numbers in (("fit", range(0, 20)), ("check", range(20, 25)), ("final", range(25, 30))):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(
            json.dumps({"instruction": f"Say {i}.", "response": str(i)}) for i in numbers))
    raw_config["data"] = {"dataset": {"path": "json", "data_files": {n: f"{n}.jsonl" for n in ("fit", "check", "final")},
                                      "splits": {"train": "fit", "val": "check", "test": "final"}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw_config))
    config = load_config(path)
    assert config.data.dataset.data_files["fit"] == str(tmp_path / "fit.jsonl")
    loaded = load_samples(config.data, seed=0)
    assert loaded.format == "instruction" and isinstance(loaded.splits["train"][0], Example)
    assert {split: len(samples) for split, samples in loaded.splits.items()} == {"train": 20, "val": 5, "test": 5}
    # val reads the same rows as train: earlier splits win (no prompt seen in training is evaluated on)
    raw_config["data"]["dataset"]["splits"] = {"train": "fit", "val": "fit", "test": "final"}
    path.write_text(yaml.safe_dump(raw_config))
    with pytest.raises(ConfigError, match="no usable rows left in split 'fit'"):
        load_samples(load_config(path).data, seed=0)


def test_a_split_that_is_not_there_is_named(tmp_path):
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(conversations(0, 10))}).save_to_disk(str(folder))
    with pytest.raises(ConfigError, match=r"`data.dataset.splits.val`: 'dev' is not a split of .* \(it has \['train'\]\)"):
        load_samples(DataConfig(dataset={"path": str(folder), "splits": {"train": "train", "val": "dev",
                                                                           "test": "train"}}), seed=0)
    with pytest.raises(ConfigError, match=r"`data.dataset.split`: 'test' is not a split of"):
        load_samples(DataConfig(dataset={"path": str(folder), "split": "test"}), seed=0)


def test_one_source_only_and_split_or_splits(tmp_path):
    with pytest.raises(ValueError, match="exactly one of `files`.*`split_files` or `dataset`"):
        DataConfig(files=["a.jsonl"], dataset={"path": "x"})
    with pytest.raises(ValueError, match="set `split`.*or `splits`"):
        DataConfig(dataset={"path": "x", "split": "train", "splits": {"train": "a", "val": "b", "test": "c"}})


def test_offline_a_dataset_missing_from_the_cache_is_a_clear_error(tmp_path):
    code = ("from lora_sweep.config import DataConfig, ConfigError\nfrom lora_sweep.data import load_samples\n"
            "try:\n    load_samples(DataConfig(dataset={'path': 'someorg/not-cached'}), seed=0)\n"
            "except ConfigError as error:\n    print(error)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "`data.dataset.path`: cannot load 'someorg/not-cached'" in out.stdout, out.stdout + out.stderr
    assert "offline, a dataset is read from the `datasets` cache only" in out.stdout


FILL_CACHE = """
import json, os, sys
from pathlib import Path
import datasets
from datasets.packaged_modules.json.json import Json
root = Path(sys.argv[1])
for split, rows in json.loads(sys.argv[2]).items():
    (root / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\\n" for row in rows))
builder = Json(dataset_name="support-chats", config_name="default", hash="0123abcd",
               data_files={split: str(root / f"{split}.jsonl") for split in json.loads(sys.argv[2])})
builder.download_and_prepare()
# Where a download of the hub's acme/support-chats (default config, commit 0123abcd) leaves its Arrow files.
cache = Path(datasets.config.HF_DATASETS_CACHE)
(cache / "support-chats").rename(cache / "acme___support-chats")
[config] = (cache / "acme___support-chats").iterdir()
config.rename(config.parent / "default")
"""


def test_offline_a_hub_id_is_read_from_a_filled_datasets_cache(tmp_path):
    """`data.dataset.path: acme/support-chats` offline: read from the `datasets` cache as a download of the hub
    dataset leaves it (filled here from local files, so the test needs no network), with its own three splits."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    splits = {"train": conversations(0, 20), "validation": conversations(20, 5), "test": conversations(25, 4)}
    subprocess.run([sys.executable, "-c", FILL_CACHE, str(tmp_path), json.dumps(splits)], env=env, check=True,
                   capture_output=True, timeout=120)
    code = ("from lora_sweep.config import DataConfig\nfrom lora_sweep.data import load_samples\n"
            "loaded = load_samples(DataConfig(dataset={'path': 'acme/support-chats'}), seed=0)\n"
            "print(loaded.format, {name: len(split) for name, split in loaded.splits.items()})\n"
            "print(loaded.splits['test'][0].messages[1].content)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["messages {'train': 20, 'val': 5, 'test': 4}", "26"], out.stdout + out.stderr


def test_a_dataset_tokenizes_like_files(tmp_path):
    from lora_sweep.testing.tiny_model import build_byte_tokenizer

    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(conversations(0, 20)), "validation": Dataset.from_list(conversations(20, 5)),
                 "test": Dataset.from_list(conversations(25, 4))}).save_to_disk(str(folder))
    tokenized = tokenize_splits(DataConfig(dataset={"path": str(folder)}), build_byte_tokenizer(), 0)
    assert (tokenized.format, tokenized.template, tokenized.counts) == ("messages", "default",
                                                                        {"train": 20, "val": 5, "test": 4})
