"""Make the `pydocs` benchmark task: real documentation text, on a model of another architecture than the demo's.

    python benchmarks/tasks/make_pydocs.py

Data (benchmarks/tasks/pydocs/pydocs.jsonl): the one-line summaries that Python's standard library ships in
its docstrings, as instruction data: the input is a function's qualified name and signature, the response is
the first sentence of its docstring. Nobody on this project wrote that text. The model
(benchmarks/tasks/pydocs/tiny-neox/) is a tiny GPT-NeoX with the byte-level tokenizer, pretrained here for a
few minutes on the full docstrings of the same modules, so that fine-tuning starts from a model that knows
the text's words but not the task.

The rows depend on the Python version's docstrings, so the files are committed: re-running the script on
another Python gives a slightly different task.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path

from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from lora_sweep.testing.tiny_model import build_byte_tokenizer, pretrain, save_initialised_model

HERE = Path(__file__).resolve().parent / "pydocs"
MODULES = [
    "abc", "argparse", "array", "base64", "binascii", "bisect", "calendar", "cmath", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.utils", "enum", "filecmp", "fnmatch", "fractions", "functools", "getpass", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "http.cookies", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "ntpath", "numbers",
    "operator", "os", "os.path", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "posixpath",
    "pprint", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "signal", "smtplib", "socket", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess",
    "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback",
    "types", "typing", "unicodedata", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "webbrowser",
    "zipfile", "zlib",
]
MAX_INPUT, MAX_RESPONSE = 48, 64  # short rows keep a 256-run table under an hour on 2 cores
SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def documented_functions() -> tuple[list[tuple[str, str]], list[str]]:
    """[(qualified name with signature, first sentence)] for public functions and methods whose summary is short,
    and every such function's whole docstring (the pretraining text)."""
    found, docs, seen = [], [], set()
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, member in sorted(vars(module).items()):
            if name.startswith("_"):
                continue
            members = [(name, member)]
            if inspect.isclass(member) and getattr(member, "__module__", "") == module.__name__:
                members += [(f"{name}.{attr}", value) for attr, value in sorted(vars(member).items())
                            if not attr.startswith("_") and callable(value)]
            for qualified, function in members:
                if not callable(function) or inspect.isclass(function):
                    continue
                doc = inspect.getdoc(function) or ""
                if doc:
                    docs.append(doc)
                paragraph = " ".join(doc.split("\n\n")[0].split())
                sentence = SENTENCE_END.split(paragraph)[0]
                try:
                    signature = str(inspect.signature(function))
                except (TypeError, ValueError):
                    signature = "(...)"
                head = f"{module_name}.{qualified}{signature}"
                if len(head) > MAX_INPUT:
                    head = f"{module_name}.{qualified}(...)"
                if not sentence or len(sentence) > MAX_RESPONSE or len(head) > MAX_INPUT or sentence in seen:
                    continue
                if not sentence[0].isalpha() or "(" in sentence.split()[0] or "->" in sentence:
                    continue  # a docstring that starts with a signature line, not prose
                seen.add(sentence)
                found.append((head, sentence))
    return found, docs


def build_tiny_neox(out_dir: Path, seed: int) -> Path:
    tokenizer = build_byte_tokenizer()
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.5,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return save_initialised_model(GPTNeoXForCausalLM, config, tokenizer, out_dir, seed)


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    functions, docs = documented_functions()
    rows = [{"instruction": "Summarise what this Python function does in one sentence.", "input": head,
             "response": sentence} for head, sentence in functions]
    with (HERE / "pydocs.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(f"{len(rows)} rows from {len(MODULES)} modules of Python {sys.version.split()[0]}")
    model_dir = build_tiny_neox(HERE / "tiny-neox", seed=3)
    pretrain(model_dir, lambda rng: rng.choice(docs)[:256], steps=800, seed=1, max_length=256, clip_norm=1.0)


if __name__ == "__main__":
    main()
