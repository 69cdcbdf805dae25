"""`sweep generate`: ask the exported model, with the prompt template the sweep trained it on.

The prompt is rendered and tokenized exactly as in training (`tokenize_example`):
same template, same default system text, special tokens added the same way.
Decoding is greedy unless a temperature is given, and stops at EOS.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer
from transformers.utils import logging as transformers_logging

from safetensors import SafetensorError

from lora_sweep.config import ConfigError, SweepConfig, cut
from lora_sweep.folder import EXPORT_DIR, MERGED_DIR
from lora_sweep.data import (FORMAT_COLUMNS, check_text_columns, prompt_ids, read_table, resolve_template,
                              row_to_example, to_samples)
from lora_sweep.pipeline import load_sweep
from lora_sweep.placement import model_positions
from lora_sweep.evaluate import stop_token_ids
from lora_sweep.templates import Conversation, Example, Message, PlainText, Sample, as_format

EXPORT_MODEL = Path(EXPORT_DIR) / MERGED_DIR
# The columns a prompts file in a data format needs: its training columns less the answer.
PROMPT_COLUMNS = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt",),
                  "text": ("text",)}


def load_exported(sweep_dir: Path) -> tuple[SweepConfig, Any, Any]:
    config, _ = load_sweep(sweep_dir)
    model_dir = Path(sweep_dir) / EXPORT_MODEL
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} not found: the sweep has no export yet (`sweep export {sweep_dir}` makes it)")
    transformers_logging.disable_progress_bar()  # the answer is the output; no loading bars around it
    try:  # a damaged export (a cut-off weights file, a broken config.json) is bad input, not a crash
        # The flag as the sweep's config gives it, as everywhere else a model or tokenizer is loaded.
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=config.model.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = cut(reason.replace(f"{model_dir.resolve()}/", "").replace(f"{model_dir}/", ""), 120)
        raise ConfigError([f"cannot load the exported model ({reason}); `sweep export {sweep_dir}` makes it again"],
                          str(model_dir)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapper of .to types it wrongly
    return config, tokenizer, model


def examples_from_file(path: Path, config: SweepConfig, data_format: str = "instruction") -> list[Sample]:
    """Prompts from a JSONL/CSV/Parquet file: rows in the sweep's own format (`messages`/`conversations` ending
    with a user turn, or with an assistant turn that is answered anew; `prompt`; `text` to continue), or rows
    in the sweep's instruction column names, which any sweep answers. A response column is not needed."""

    columns = config.data.columns
    if not Path(path).exists():
        raise ConfigError([f"`--file`: prompts file not found: {path}"], str(path))
    # read_table refuses a folder, a FIFO, an empty file, a file that is not UTF-8 (or UTF-16 with its BOM)
    frame: pd.DataFrame = read_table(path, field="--file")
    own = PROMPT_COLUMNS.get(data_format)
    if own and all(column in frame.columns for column in own):
        return _prompts_in_format(frame, config, data_format, str(path))
    if columns.instruction not in frame.columns:
        formats = f" or `{'`, `'.join(own)}` (the sweep's data format, {data_format})" if own else ""
        raise ConfigError([f"`--file`: no `{columns.instruction}` column (the sweep's data.columns.instruction){formats}; "
                           f"the file has {list(frame.columns)}"], str(path))
    check_text_columns(frame, columns, str(path), fields=("system", "instruction", "input"))
    # A response column, if the file has one, is not part of the prompt.
    examples = [replace(row_to_example(row, config.data), response="") for row in frame.to_dict("records")]
    empty = [i + 1 for i, e in enumerate(examples) if not e.instruction]
    if empty:
        raise ConfigError([f"`{columns.instruction}`: empty in row(s) {empty[:10]}; every prompt needs an instruction"],
                          str(path))
    return list(examples)


def _prompts_in_format(frame: pd.DataFrame, config: SweepConfig, data_format: str, source: str) -> list[Sample]:
    """Rows in the sweep's own format as prompts: a conversation that ends with the user's turn gets a placeholder
    assistant turn (the prompt is everything before the last assistant turn), then is checked as training data is."""
    if data_format in ("messages", "sharegpt"):
        column = FORMAT_COLUMNS[data_format][0]
        role_key, content_key, assistant = (("role", "content", "assistant") if data_format == "messages"
                                            else ("from", "value", "gpt"))
        rows = []
        for value in frame[column].tolist():
            turns = value.tolist() if hasattr(value, "tolist") else value
            if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and \
                    turns[-1].get(role_key) in ("user", "human"):
                turns = [*turns, {role_key: assistant, content_key: "-"}]
            rows.append(turns)
        frame = frame.assign(**{column: pd.Series(rows, index=frame.index, dtype=object)})
    elif data_format == "prompt_completion":
        frame = frame.assign(completion="-")  # the answer is generated; a completion column is not needed
    else:  # text: each text is a prompt to continue
        frame = frame.assign(prompt=frame["text"], completion="-")
        data_format = "prompt_completion"
    samples, dropped = to_samples(frame, config.data, data_format, source)
    if dropped:
        raise ConfigError([f"`--file`: {dropped} of {len(frame)} prompts are empty"], source)
    return samples


def stream_answer(model: Any, tokenizer: Any, prompt: list[int], max_new_tokens: int,
                  temperature: float = 0.0) -> Iterator[str]:
    """Yield the answer to the prompt's token ids piece by piece as it is generated."""
    from threading import Thread

    input_ids = torch.tensor([prompt], device=model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    settings: dict[str, Any] = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(model, tokenizer), streamer=streamer,
        do_sample=temperature > 0,
    )
    if temperature > 0:
        settings["temperature"] = temperature
    failure: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**settings)
        except BaseException as error:  # e.g. out of memory: end the stream so the reader does not wait forever
            failure.append(error)
            streamer.end()

    worker = Thread(target=run, daemon=True)
    worker.start()
    yield from streamer
    worker.join()
    if failure:
        raise failure[0]


class ExportedModel:
    """The sweep's exported model, loaded once, with the sweep's prompt template."""

    def __init__(self, sweep_dir: Path):
        self.config, self.tokenizer, self.model = load_exported(sweep_dir)
        _, record = load_sweep(sweep_dir)
        # As the sweep prepared its data (provenance records both; a sweep from before formats read instructions).
        self.format = str(record.get("data_format", "instruction"))
        self.template = str(record.get("template") or resolve_template(self.config.data, self.format, self.tokenizer))

    def prompt(self, sample: Sample) -> list[int]:
        """The question's prompt as the sweep trained on it, as token ids: an instruction-format question in the
        sweep's own format, a sample of that format as it is."""
        if isinstance(sample, Example):
            sample = as_format(sample, self.format)
        return prompt_ids(sample, self.template, self.tokenizer)

    def stream(self, example: Sample, max_new_tokens: int, temperature: float = 0.0) -> Iterator[str]:
        return stream_answer(self.model, self.tokenizer, self.prompt(example), max_new_tokens, temperature)

    def positions(self) -> Optional[int]:
        """Tokens the model can attend over (prompt and answer together), when its config says."""
        found = model_positions(self.model.config)
        return found[1] if found else None

    def check_fits(self, examples: list[Sample], max_new_tokens: int) -> None:
        """Every prompt plus `max_new_tokens` fits the model's positions: a ConfigError naming the first that
        does not (a model asked past them generates garbage or fails, after a long wait)."""
        positions = self.positions()
        if positions is None:
            return
        if max_new_tokens >= positions:
            raise ConfigError([f"`--max-new-tokens`: {max_new_tokens} is not below the model's {positions} positions "
                               "(prompt and answer share them)"], "generate")
        for number, example in enumerate(examples, start=1):
            # A token is a few characters: a prompt this long cannot fit, and tokenizing it would take long.
            characters = prompt_characters(example)
            length = characters // 64 if characters > 64 * positions else len(self.prompt(example))
            if length + max_new_tokens > positions:
                raise ConfigError([f"prompt {number}: about {length:,} tokens with --max-new-tokens {max_new_tokens} "
                                   f"is more than the model's {positions} positions; shorten it or lower "
                                   "--max-new-tokens"], "generate")

    def answer(self, example: Sample, max_new_tokens: int, temperature: float = 0.0) -> str:
        return "".join(self.stream(example, max_new_tokens, temperature)).strip()


def example_for(question: str, config: SweepConfig, system: Optional[str] = None, input_text: str = "") -> Example:
    return Example(instruction=question, response="", system=config.data.default_system if system is None else system,
                   input=input_text)


def with_system(sample: Sample, system: str) -> Sample:
    """The prompt with `--system` as its system text (a conversation's own system turn replaced)."""
    if isinstance(sample, Example):
        return replace(sample, system=system)
    if isinstance(sample, Conversation):
        turns = sample.messages[1:] if sample.messages[0].role == "system" else sample.messages
        return Conversation(((Message("system", system),) if system else ()) + turns)
    return sample  # plain text has no system text


def prompt_fields(sample: Sample) -> dict[str, Any]:
    """What was asked, for `--json` and the heading of each answer: the instruction-format fields, a
    conversation's turns before the answer, or a plain-text prompt."""
    if isinstance(sample, Example):
        return {"instruction": sample.instruction, "input": sample.input}
    if isinstance(sample, Conversation):
        return {"messages": [{"role": m.role, "content": m.content} for m in sample.messages[:-1]]}
    assert isinstance(sample, PlainText)
    return {"prompt": sample.prompt}


def prompt_heading(sample: Sample) -> str:
    """One line naming the prompt above its streamed answer."""
    if isinstance(sample, Example):
        return f"### {sample.instruction}" + (f" | {sample.input}" if sample.input else "")
    if isinstance(sample, Conversation):
        return f"### {sample.messages[-2].content}"
    return f"### {sample.prompt}"


def prompt_characters(sample: Sample) -> int:
    """The prompt's length in characters, known before tokenizing it."""
    if isinstance(sample, Example):
        return len(sample.system) + len(sample.instruction) + len(sample.input)
    if isinstance(sample, Conversation):
        return sum(len(m.content) for m in sample.messages)
    return len(sample.prompt)
