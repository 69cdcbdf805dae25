"""Make the demo's shipped assets: examples/data/demo.jsonl, examples/data/chat.jsonl and examples/tiny-llama/.

Deterministic from the seed, so re-running it reproduces the committed files.
The base model is a tiny Llama built from a config and pretrained here for about
a minute on plain sentences about words ("abc reversed is cba.") and on two
instruction tasks in the default template (repeat, capitals). The sweep's data
adds three tasks it was not instruction-tuned on (first letter, last letter,
backwards), so fine-tuning has something to learn and good and bad learning
rates give clearly different losses. chat.jsonl holds the same tasks as multi-turn `messages` conversations
(a second question about the same word), for examples/chat.yaml; the model's tokenizer gets a chat template
(Zephyr's shape: <|role|> headers, each turn ending with EOS) so that those are rendered with it.

    python scripts/make_demo_assets.py --chat-only   # chat.jsonl and the chat template, without pretraining

    python scripts/make_demo_assets.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from lora_sweep.templates import Example, render_default
from lora_sweep.testing.tiny_model import build_tiny_llama, pretrain

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ["", "You are a careful assistant that answers with the word only."]
TASKS = {
    "Repeat the word.": lambda w: w,
    "Write the word in capital letters.": str.upper,
    "What is the first letter of the word?": lambda w: w[0],
    "What is the last letter of the word?": lambda w: w[-1],
    "Write the word backwards.": lambda w: w[::-1],
}


def make_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        instruction = rng.choice(list(TASKS))
        rows.append(
            {"system": rng.choice(SYSTEMS), "instruction": instruction, "input": word, "response": TASKS[instruction](word)}
        )
    # A few duplicates and untidy whitespace, as real data has; preparation cleans them.
    rows.extend(dict(row) for row in rows[:10])
    rows[5]["response"] = "  " + rows[5]["response"] + " \r\n"
    return rows


# Zephyr's shape with this tokenizer's tokens: a turn ends with EOS, so the model learns to stop after its answer.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_chat_rows(count: int, seed: int) -> list[dict[str, list[dict[str, str]]]]:
    """Conversations of two or three exchanges about one word; some start with a system turn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        word = _word(rng)
        system = rng.choice(SYSTEMS)
        messages = [{"role": "system", "content": system}] if system else []
        for instruction in rng.sample(list(TASKS), rng.randint(2, 3)):
            messages.append({"role": "user", "content": f"{instruction} The word: {word}"})
            messages.append({"role": "assistant", "content": TASKS[instruction](word)})
        rows.append({"messages": messages})
    return rows


def add_chat_template(model_dir: Path) -> None:
    """The chat template in the model's tokenizer_config.json (where transformers reads it)."""
    path = model_dir / "tokenizer_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def write_chat_assets() -> None:
    chat = ROOT / "examples" / "data" / "chat.jsonl"
    with chat.open("w", encoding="utf-8") as handle:
        for row in make_chat_rows(600, seed=11):
            handle.write(json.dumps(row) + "\n")
    add_chat_template(ROOT / "examples" / "tiny-llama")
    print(f"wrote {chat} and the chat template of {ROOT / 'examples' / 'tiny-llama'}")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))


def pretraining_text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        sentences = []
        for _ in range(4):
            w = _word(rng)
            sentences.append(rng.choice([
                f"{w} said again is {w}.", f"{w} in capitals is {w.upper()}.", f"{w} starts with {w[0]}.",
                f"{w} ends with {w[-1]}.", f"{w} reversed is {w[::-1]}.",
            ]))
        return " ".join(sentences)
    w = _word(rng)
    instruction = rng.choice(["Repeat the word.", "Write the word in capital letters."])
    response = TASKS[instruction](w)
    return render_default(Example(instruction=instruction, input=w, response=response)) + response


def main() -> None:
    if "--chat-only" in sys.argv:
        write_chat_assets()
        return
    data = ROOT / "examples" / "data" / "demo.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    with data.open("w", encoding="utf-8") as handle:
        for row in make_rows(1200, seed=7):
            handle.write(json.dumps(row) + "\n")
    model_dir = build_tiny_llama(
        ROOT / "examples" / "tiny-llama", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=7
    )
    pretrain(model_dir, pretraining_text, steps=1500, seed=1, log_every=300)
    print(f"wrote {data} and {ROOT / 'examples' / 'tiny-llama'}")
    write_chat_assets()


if __name__ == "__main__":
    main()
