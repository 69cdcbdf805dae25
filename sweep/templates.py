"""Prompt templates: an example -> (prompt text, response text).

The split matters: the prompt's tokens are masked out of the labels, so the loss
is computed on the response (and EOS) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

TEMPLATE_NAMES = ("default", "alpaca", "chat")


@dataclass(frozen=True)
class Example:
    instruction: str
    response: str
    system: str = ""
    input: str = ""


def render_default(example: Example) -> str:
    """The project's own format: `### System / ### Instruction / ### Response`; System is left out when empty."""
    instruction = example.instruction if not example.input else f"{example.instruction}\n\n{example.input}"
    parts = []
    if example.system:
        parts.append(f"### System:\n{example.system}\n\n")
    parts.append(f"### Instruction:\n{instruction}\n\n### Response:\n")
    return "".join(parts)


def render_alpaca(example: Example) -> str:
    header = example.system or (
        "Below is an instruction that describes a task"
        + (", paired with an input that provides further context" if example.input else "")
        + ". Write a response that appropriately completes the request."
    )
    body = f"### Instruction:\n{example.instruction}\n\n"
    if example.input:
        body += f"### Input:\n{example.input}\n\n"
    return f"{header}\n\n{body}### Response:\n"


def render_chat(example: Example, tokenizer: Any) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("`data.template`: 'chat' needs a tokenizer with a chat template, but this tokenizer has none")
    messages = []
    if example.system:
        messages.append({"role": "system", "content": example.system})
    user = example.instruction if not example.input else f"{example.instruction}\n\n{example.input}"
    messages.append({"role": "user", "content": user})
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def prompt_renderer(name: str, tokenizer: Optional[Any] = None) -> Callable[[Example], str]:
    if name == "default":
        return render_default
    if name == "alpaca":
        return render_alpaca
    if name == "chat":
        return lambda example: render_chat(example, tokenizer)
    raise ValueError(f"`data.template`: must be one of {', '.join(TEMPLATE_NAMES)}, but got {name!r}")


def tokenizer_adds_special_tokens(name: str) -> bool:
    """Whether to let the tokenizer add its special tokens (BOS) to a rendered prompt.

    A chat template writes its own (a second BOS would change what the model sees); the
    plain templates are text, and the tokenizer adds them as it would for any text.
    """
    return name != "chat"
