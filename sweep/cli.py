"""The `sweep` command line.

Exit codes: 0 success; 1 the sweep ran but failed (no usable trial, export
verification failed, a full disk); 2 bad input, reported before anything runs;
130 stopped by Ctrl-C, 143 stopped by SIGTERM, each with its state saved
(continue with `sweep resume`).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

import typer

from lora_sweep import examples
from lora_sweep.config import ConfigError, cut, load_config, shown
from lora_sweep.folder import CONFIG_FILE

if TYPE_CHECKING:
    from lora_sweep.pipeline import SweepOutcome
    from lora_sweep.progress import SweepStatus
    from lora_sweep.templates import Sample

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hyperparameter sweeps for LoRA fine-tuning.")
DEMO_CONFIG = Path(examples.__file__).resolve().parent / "demo.yaml"  # package data: works outside a checkout


def _fail(message: str, code: int) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _error_lines(error: Exception) -> str:
    return "\n".join(f"error: {line}" for line in str(error).splitlines())


class _WarningLines(logging.Handler):
    """The engine's warnings as `warning: ...` lines on the current stderr (looked up at each line, so a
    test runner's captured stderr gets them too)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"{record.levelname.lower()}: {record.getMessage()}\n")


def _show_warnings() -> None:
    logger = logging.getLogger("lora_sweep")
    if not any(isinstance(handler, _WarningLines) for handler in logger.handlers):
        handler = _WarningLines(logging.WARNING)
        logger.addHandler(handler)


_show_warnings()


# Inputs that break the operating system's or Python's own limits, wherever they are first touched: a path
# too long or looping, a NUL byte, nesting or digits beyond Python's limits. They are bad input like any other.
_PATH_ERRNOS = (errno.ENAMETOOLONG, errno.ELOOP, errno.EILSEQ)


def _input_beyond_limits(error: BaseException) -> Optional[str]:
    text = str(error)
    if isinstance(error, OSError) and error.errno in _PATH_ERRNOS:
        return f"{error.strerror}: {_shown_path(error.filename)}"
    if isinstance(error, RuntimeError) and "Symlink loop" in text:
        return f"a path loops through symbolic links ({cut(text, 120)})"
    if isinstance(error, ValueError) and ("embedded null" in text or "Exceeds the limit" in text):
        return "an input holds a NUL byte" if "null" in text else "an input holds a number of thousands of digits"
    if isinstance(error, RecursionError):
        return "an input is nested too deeply (thousands of levels)"
    if isinstance(error, UnicodeError):
        return f"an input cannot be encoded ({cut(text, 120)})"
    return None


def _shown_path(path: object) -> str:
    return shown(str(path)) if path is not None else "(a path)"


def refuses_inputs_beyond_limits(command: Callable[..., None]) -> Callable[..., None]:
    """Every command: an input beyond the OS's or Python's limits ends in one `error:` line and exit 2."""

    @functools.wraps(command)
    def guarded(*args: object, **kwargs: object) -> None:
        try:
            command(*args, **kwargs)
        except (OSError, RuntimeError, ValueError, RecursionError) as error:
            reason = _input_beyond_limits(error)
            if reason is None:
                raise
            _fail(f"error: {reason}", 2)

    return guarded


def _fail_os_error(error: OSError) -> None:
    """An OS error out of a command: a path beyond the system's limits is bad input (exit 2); anything else,
    a full disk above all, ends the command that ran (exit 1), what was finished kept."""
    reason = _input_beyond_limits(error)
    if reason:
        _fail(f"error: {reason}", 2)
    where = f": {error.filename}" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        _fail(f"error: the disk is full ({error.strerror}{where}); what was finished is kept: free some space, "
              "then `sweep resume` (or `sweep export`) the sweep folder", 1)
    _fail(f"error: {error.strerror or error}{where}", 1)


def _run_and_report(start: Callable[[], "SweepOutcome"]) -> None:
    from lora_sweep.export import ExportVerificationError
    from lora_sweep.signals import SweepInterrupted
    from lora_sweep.results import NoUsableTrialError
    from lora_sweep.signals import stop_exit_code, stop_on_sigterm_like_ctrl_c

    stop_on_sigterm_like_ctrl_c()
    try:
        outcome = start()
    except ConfigError as error:
        _fail(_error_lines(error), 2)
    except SweepInterrupted as error:
        _fail(f"stopped: {error}", stop_exit_code())
    except KeyboardInterrupt:  # before the sweep folder was made: nothing to resume
        _fail("stopped before anything was written", stop_exit_code())
    except (NoUsableTrialError, ExportVerificationError) as error:
        _fail(_error_lines(error), 1)
    except OSError as error:  # a full disk while writing a checkpoint's record or the export; or a bad path
        _fail_os_error(error)
    from lora_sweep.evaluate import shown_match

    final = outcome.final
    counts = {status: sum(r.status == status for r in outcome.records) for status in ("completed", "stopped early", "errored")}
    typer.echo(f"\nsweep finished: {len(outcome.records)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    typer.echo(f"best trial {final.best.trial_id} at step {final.best.best_step}: {final.best.params}")
    typer.echo(
        f"test split ({final.tuned.examples} examples): base loss {final.base.loss:.4f} exact match "
        f"{shown_match(final.base.exact_match)} -> tuned loss {final.tuned.loss:.4f} exact match "
        f"{shown_match(final.tuned.exact_match)}"
    )
    typer.echo(f"results: {outcome.sweep_dir}/ (leaderboard.csv, final_metrics.json, export/, tensorboard/)")


@app.command()
@refuses_inputs_beyond_limits
def run(
    config: Path = typer.Argument(..., help="Sweep YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. search.num_trials=4"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing sweep folder of the same name."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep folder of the same name if it exists."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Run on an existing Ray cluster: auto, or HOST:PORT of its head (sets ray.address)."),
) -> None:
    """Run a sweep, then promote, evaluate and export the best checkpoint.

    Examples: sweep run examples/demo.yaml search.num_trials=4 training.max_steps=100
              sweep run my_sweep.yaml --address auto     (on a node of a running Ray cluster)
    """
    if overwrite and resume:
        _fail("error: --overwrite and --resume exclude each other", 2)
    _run_config(config, (overrides or []) + ([f"ray.address={address}"] if address else []), overwrite, resume)


def _run_config(config_path: Path, overrides: list[str], overwrite: bool, resume: bool = False) -> None:
    from lora_sweep.pipeline import resume as resume_sweep
    from lora_sweep.pipeline import run as run_sweep

    def start() -> "SweepOutcome":
        config = load_config(config_path, overrides)
        try:
            if resume and (config.sweep_dir / CONFIG_FILE).is_file():
                return resume_sweep(config.sweep_dir, live=True)
            return run_sweep(config, overwrite=overwrite, live=True)
        except ConfigError as error:
            raise error.in_config_file(config_path) from None

    _run_and_report(start)


@app.command()
@refuses_inputs_beyond_limits
def resume(
    sweep_dir: str = typer.Argument(..., help="The folder of a stopped or crashed sweep, e.g. results/demo, or its "
                                    "storage, e.g. s3://bucket/prefix/NAME, on a machine without the folder"),
    into: Optional[Path] = typer.Option(None, "--into", help="With a storage URI: the local folder to resume in "
                                        "(default: the config's output_dir/NAME, or results/NAME)."),
) -> None:
    """Continue a sweep that was stopped (Ctrl-C) or killed: finished trials are kept, running ones restart
    from their last checkpoint, and the sweep ends with the configured number of trials. Given its storage
    URI, the sweep continues from storage alone: on another machine when the driver's is gone.

    Examples: sweep resume results/demo
              sweep resume s3://bucket/sweeps/my-sweep
    """
    from lora_sweep.pipeline import resume as resume_sweep
    from lora_sweep.pipeline import resume_from_storage

    if into is not None and "://" not in sweep_dir:
        _fail("error: `--into` is for a sweep resumed from its storage URI; a folder resumes where it is", 2)

    def start() -> "SweepOutcome":
        if "://" in sweep_dir:
            return resume_from_storage(sweep_dir, into, live=True)
        try:
            return resume_sweep(Path(sweep_dir), live=True)
        except ConfigError as error:
            raise error.in_config_file(Path(sweep_dir) / CONFIG_FILE) from None

    _run_and_report(start)


@app.command()
@refuses_inputs_beyond_limits
def demo(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides on examples/demo.yaml"),
) -> None:
    """Run the offline demo (examples/demo.yaml) into results/demo/, replacing an earlier demo.

    Example: sweep demo
    """
    _run_config(DEMO_CONFIG, overrides or [], overwrite=True)


@app.command()
@refuses_inputs_beyond_limits
def best(
    sweep_dir: Path = typer.Argument(..., help="A sweep folder, e.g. results/demo"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Show the promoted trial: params, metrics and checkpoint.

    Example: sweep best results/demo
    """
    from lora_sweep.results import read_best

    try:
        record = read_best(sweep_dir)
    except (FileNotFoundError, ConfigError) as error:
        _fail(_error_lines(error), 2)
    if as_json:
        typer.echo(json.dumps(asdict(record), indent=2, default=str))
        return
    typer.echo(f"trial:      {record.trial_id} ({record.status}, {record.steps_run} steps, {record.wall_seconds}s)")
    typer.echo(f"best step:  {record.best_step}")
    typer.echo(f"metric:     {record.best_metric}")
    for key, value in sorted(record.params.items()):
        typer.echo(f"  {key} = {value}")
    typer.echo(f"checkpoint: {record.best_checkpoint}")


@app.command()
@refuses_inputs_beyond_limits
def plan(
    config: Path = typer.Argument(..., help="Sweep YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. search.num_trials=4"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Check a sweep and show what it would do, without running it: the resolved search space, the number of
    trials, the most training steps ASHA could spend, the disk it will use and what each trial asks for.

    Runs every check `sweep run` runs; starts no Ray and writes nothing.

    Example: sweep plan examples/demo.yaml search.num_trials=24
    """
    from lora_sweep.plan import make_plan, plan_json, plan_lines

    try:
        the_plan = make_plan(load_config(config, overrides or []))
    except ConfigError as error:
        _fail(_error_lines(error.in_config_file(config)), 2)
    if as_json:
        typer.echo(json.dumps(plan_json(the_plan), indent=2))
        return
    typer.echo("\n".join(plan_lines(the_plan)))


@app.command()
@refuses_inputs_beyond_limits
def status(
    sweep_dir: str = typer.Argument(..., help="A sweep folder, e.g. results/demo, or its storage, "
                                    "e.g. s3://bucket/prefix/NAME"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    watch: bool = typer.Option(False, "--watch", help="Redraw every second until the sweep ends (Ctrl-C to leave)."),
) -> None:
    """Show where a sweep stands: trials running, done, stopped early and errored, the best so far, elapsed and ETA.

    Works while the sweep runs (from another terminal) and after it ends. A sweep whose
    driver was killed shows as stopped: continue it with `sweep resume`. Given the sweep's
    storage URI, it reads what the driver copied there (at least every minute), from any machine.

    Example: sweep status results/demo --watch
    """
    from rich.console import Console
    from rich.live import Live

    from lora_sweep.progress import ACTIVE_STATES, read_status, read_stored_status, render

    def read() -> "SweepStatus":
        if "://" not in sweep_dir:
            return read_status(Path(sweep_dir))
        status, age = read_stored_status(sweep_dir)
        if not as_json:
            typer.echo(f"(as its driver copied it to storage {age:.0f} s ago"
                       + (f"; its driver stopped copying: `sweep resume {sweep_dir}` continues the sweep)"
                          if status.state == "stopped" and age > 180 else ")"), err=True)
        return status

    try:
        current = read()
    except (FileNotFoundError, ConfigError) as error:
        _fail(_error_lines(error), 2)
    if as_json:
        typer.echo(json.dumps(current.to_json(), indent=2, default=str))
        return
    console = Console()
    if not watch:
        console.print(render(current, max_rows=len(current.trials), width=console.width))
        return
    rows = max(3, console.height - 6)  # a live view taller than the terminal cannot be redrawn in place
    try:
        with Live(render(current, rows, console.width), console=console, auto_refresh=False) as live:
            while current.state in ACTIVE_STATES:
                time.sleep(1.0 if "://" not in sweep_dir else 10.0)
                current = read()
                live.update(render(current, rows, console.width), refresh=True)
    except (FileNotFoundError, ConfigError) as error:  # the folder went away, or was damaged, while watched
        _fail(_error_lines(error), 2)


@app.command()
@refuses_inputs_beyond_limits
def report(sweep_dir: Path = typer.Argument(..., help="A sweep folder, e.g. results/demo")) -> None:
    """Write SWEEP_DIR/report/index.html with figures: optimisation history, hyperparameter importances,
    parallel coordinates, learning curves of all trials (early-stopped ones marked) and best vs base on
    the test split. Open it in any browser; it needs no server.

    Example: sweep report results/demo && xdg-open results/demo/report/index.html
    """
    from lora_sweep.report import write_report

    try:
        result = write_report(sweep_dir)
    except (FileNotFoundError, ConfigError) as error:
        _fail(_error_lines(error), 2)
    typer.echo(f"report: {result.index} ({len(result.figures)} figures)")
    for title, why in result.skipped.items():
        typer.echo(f"  not drawn: {title} ({why})")


@app.command()
@refuses_inputs_beyond_limits
def generate(
    sweep_dir: Path = typer.Argument(..., help="A finished sweep folder, e.g. results/demo"),
    question: Optional[str] = typer.Argument(None, help="The instruction to answer (or use --file)."),
    file: Optional[Path] = typer.Option(None, "--file", help="JSONL/CSV/Parquet of prompts: in the sweep's data format "
                                        "(messages, conversations, prompt, text) or its instruction columns."),
    input_text: str = typer.Option("", "--input", help="Input text that goes with the instruction, as in the data."),
    system: Optional[str] = typer.Option(None, "--system", help="System text; default: the sweep's data.default_system."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Most tokens to generate per answer."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 decodes greedily; above 0 samples."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per prompt (instruction, input, answer)."),
) -> None:
    """Answer with the exported model (SWEEP_DIR/export/merged), prompted with the sweep's own template, and
    stream the answer as it is generated.

    Examples: sweep generate results/demo "Repeat the word." --input hello
              sweep generate results/demo --file prompts.jsonl --json
    """
    from lora_sweep.generate import (ExportedModel, example_for, examples_from_file, prompt_fields, prompt_heading,
                                     with_system)
    from lora_sweep.pipeline import load_sweep

    if (question is None) == (file is None):
        _fail("error: give either a QUESTION or --file PROMPTS (exactly one of them)", 2)
    if max_new_tokens < 1:
        _fail(f"error: `--max-new-tokens`: must be at least 1, but got {max_new_tokens}", 2)
    if not 0.0 <= temperature < float("inf"):  # also NaN
        _fail(f"error: `--temperature`: must be a finite number >= 0 (0 decodes greedily), but got {temperature}", 2)
    try:
        config, record = load_sweep(sweep_dir)
        # Exactly one of them is given (checked above): without a file there is a question.
        examples: list[Sample] = (
            examples_from_file(file, config, str(record.get("data_format", "instruction"))) if file is not None
            else [example_for(question or "", config, system, input_text)])
        if file and system is not None:
            examples = [with_system(e, system) for e in examples]
        model = ExportedModel(sweep_dir)
        model.check_fits(examples, max_new_tokens)  # before the first answer: no prompt is cut or overruns
    except (FileNotFoundError, ConfigError) as error:
        _fail(_error_lines(error), 2)
    for example in examples:
        if as_json:
            answer = model.answer(example, max_new_tokens, temperature)
            typer.echo(json.dumps({**prompt_fields(example), "answer": answer}))
            continue
        if file:
            typer.echo(cut(prompt_heading(example), 200))
        for piece in model.stream(example, max_new_tokens, temperature):
            sys.stdout.write(piece)
            sys.stdout.flush()
        typer.echo("")


@app.command()
@refuses_inputs_beyond_limits
def export(sweep_dir: Path = typer.Argument(..., help="A finished sweep folder, e.g. results/demo")) -> None:
    """Evaluate the promoted checkpoint on the test split and (re-)export it to SWEEP_DIR/export/.

    Example: sweep export results/demo
    """
    from lora_sweep.export import ExportVerificationError
    from lora_sweep.pipeline import export as export_sweep
    from lora_sweep.signals import stop_exit_code, stop_on_sigterm_like_ctrl_c

    stop_on_sigterm_like_ctrl_c()
    try:
        report = export_sweep(sweep_dir)
    except (FileNotFoundError, ConfigError) as error:
        _fail(_error_lines(error), 2)
    except ExportVerificationError as error:
        _fail(_error_lines(error), 1)
    except OSError as error:  # a full disk: the previous export stays as it was
        _fail_os_error(error)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM
        _fail(f"stopped: the previous export is as it was; `sweep export {sweep_dir}` makes it again", stop_exit_code())
    typer.echo(f"exported to {report.export_dir} (max logit difference {report.max_logit_difference:.2e})")
    typer.echo(f"test loss base {report.base.loss:.4f} -> tuned {report.tuned.loss:.4f}")


def main() -> None:  # pragma: no cover - console entry for `python -m lora_sweep.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
