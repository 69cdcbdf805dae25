"""Prompt templates: what the model reads of an example, in pieces that do or do not carry the loss.

Every data format ends up as `Segment`s: text, whether its tokens carry labels, and whether the tokenizer's EOS
follows. The instruction format renders a prompt (default, alpaca or chat template) and a response; conversations
render turn by turn, with the tokenizer's chat template or the default template; prompt/completion pairs and plain
text are used as written. Segments are tokenized one by one, so the label boundary is exact (tokenizing the joined
text can merge tokens across it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from jinja2 import TemplateError

TEMPLATE_NAMES = ("default", "alpaca", "chat")
Role = Literal["system", "user", "assistant"]
TrainOn = Literal["all_assistant", "last_assistant"]


@dataclass(frozen=True)
class Example:
    instruction: str
    response: str
    system: str = ""
    input: str = ""


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """A checked conversation: an optional system turn, then user and assistant turns in turn, ending with the
    assistant's (lora_sweep.data checks each row before it becomes one)."""

    messages: tuple[Message, ...]

    @property
    def response(self) -> str:
        """The last assistant turn: what the final evaluation compares a generation with."""
        return self.messages[-1].content


@dataclass(frozen=True)
class PlainText:
    """`prompt_completion` (the completion carries the loss) and `text` (no prompt: every token carries it)."""

    prompt: str
    completion: str

    @property
    def response(self) -> str:
        return self.completion


Sample = Union[Example, Conversation, PlainText]


def prompt_key(sample: Sample) -> str:
    """What makes two samples the same question: everything before the answer. Samples sharing it stay in one
    split, so that no test prompt is seen in training, and it is what de-duplication compares."""
    if isinstance(sample, Example):
        return json.dumps([sample.system, sample.instruction, sample.input])
    if isinstance(sample, Conversation):
        return json.dumps([[m.role, m.content] for m in sample.messages[:-1]])
    return json.dumps(["plain", sample.prompt] if sample.prompt else ["text", sample.completion])


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool  # its tokens carry labels
    special: bool = False  # the tokenizer adds its special tokens (BOS): the first piece of a plain-text template
    eos: bool = False  # the tokenizer's EOS follows (an answer of a plain-text template: it learns to stop)
    answer: bool = False  # an assistant turn (or completion), trained or not: the last one is what evaluation asks for


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


class ChatTemplateError(ValueError):
    """The tokenizer's chat template fails on a conversation, or does not render it turn by turn."""


def default_conversation_segments(conversation: Conversation) -> list[Segment]:
    """The default template turn by turn: `### System` once, `### Instruction` for each user turn and the
    assistant's answer after `### Response`, followed by EOS. One user and one assistant turn give exactly the
    instruction format's tokens."""
    segments: list[Segment] = []
    pending = ""
    for message in conversation.messages:
        if message.role == "system":
            pending += f"### System:\n{message.content}\n\n"
        elif message.role == "user":
            separator = "\n\n" if segments else ""  # after an answer's EOS
            pending += f"{separator}### Instruction:\n{message.content}\n\n### Response:\n"
        else:
            segments.append(Segment(pending, trained=False, special=not segments))
            segments.append(Segment(message.content, trained=True, eos=True, answer=True))
            pending = ""
    return segments


def chat_conversation_segments(conversation: Conversation, tokenizer: Any) -> list[Segment]:
    """The tokenizer's chat template, cut at each assistant turn: the text before it (with the generation prompt)
    and the turn itself with its end-of-turn tokens, as the template writes them.

    Each cut is the difference between rendering the conversation up to a turn and up to the one before, so a
    template that renders a conversation differently as it grows (one that drops earlier turns' reasoning, say)
    cannot be cut exactly and is refused."""
    messages = [{"role": m.role, "content": m.content} for m in conversation.messages]
    segments: list[Segment] = []
    rendered = ""
    try:
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = str(tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True))
            through = str(tokenizer.apply_chat_template(messages[: index + 1], tokenize=False))
            if not before.startswith(rendered) or not through.startswith(before):
                raise ChatTemplateError("the chat template does not render the conversation turn by turn (a turn "
                                        "changes the text before it), so the assistant turns cannot be masked exactly")
            segments.append(Segment(before[len(rendered):], trained=False))
            segments.append(Segment(through[len(before):], trained=True, answer=True))
            rendered = through
    except TemplateError as error:  # e.g. a template that refuses a system turn
        raise ChatTemplateError(f"the chat template fails on it: {error}") from None
    return segments


def segments_for(sample: Sample, template: str, tokenizer: Any, train_on: TrainOn = "all_assistant") -> list[Segment]:
    """The sample as segments, in the resolved `template` (unused for plain text)."""
    if isinstance(sample, Example):
        prompt = prompt_renderer(template, tokenizer)(sample)
        segments = [Segment(prompt, trained=False, special=tokenizer_adds_special_tokens(template)),
                    Segment(sample.response, trained=True, eos=True, answer=True)]
    elif isinstance(sample, Conversation):
        segments = (chat_conversation_segments(sample, tokenizer) if template == "chat"
                    else default_conversation_segments(sample))
    elif sample.prompt:
        segments = [Segment(sample.prompt, trained=False, special=True),
                    Segment(sample.completion, trained=True, eos=True, answer=True)]
    else:
        segments = [Segment(sample.completion, trained=True, special=True, eos=True)]
    if train_on == "last_assistant" and any(segment.answer for segment in segments):  # text has no answer: all of it
        last = max(i for i, segment in enumerate(segments) if segment.answer)
        segments = [Segment(s.text, s.trained and i == last, s.special, s.eos, s.answer)
                    for i, s in enumerate(segments)]
    return segments


def as_format(example: Example, data_format: str) -> Sample:
    """A question asked as an instruction-format example, in the shape of another format's samples (with a
    placeholder answer: what is rendered is the prompt before it)."""
    question = example.instruction if not example.input else f"{example.instruction}\n\n{example.input}"
    if data_format in ("messages", "sharegpt"):
        system = (Message("system", example.system),) if example.system else ()
        return Conversation((*system, Message("user", question), Message("assistant", "-")))
    if data_format in ("prompt_completion", "text"):
        return PlainText(prompt=question, completion="-")
    return example


def prompt_for(sample: Sample, template: str, tokenizer: Any) -> tuple[str, bool]:
    """The text a model is prompted with for the sample's (last) answer, and whether the tokenizer adds its
    special tokens to it: as in training, without the answer."""
    segments = segments_for(sample, template, tokenizer)
    last = max((i for i, segment in enumerate(segments) if segment.answer), default=0)
    return "".join(segment.text for segment in segments[:last]), bool(segments) and segments[0].special


def tokenizer_adds_special_tokens(name: str) -> bool:
    """Whether to let the tokenizer add its special tokens (BOS) to a rendered prompt.

    A chat template writes its own (a second BOS would change what the model sees); the
    plain templates are text, and the tokenizer adds them as it would for any text.
    """
    return name != "chat"
