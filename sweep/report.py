"""`sweep report`: a static HTML page with the sweep's figures, for people who would rather look than read logs.

Figures come from Optuna's own matplotlib plots (optimisation history, parameter
importances, parallel coordinates) and matplotlib (learning curves of every trial,
best vs base on the test split). Everything is read from the sweep folder: the
Optuna study, Tune's per-trial results, the leaderboard and final_metrics.json.
"""

from __future__ import annotations

import html
import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from lora_sweep.config import ConfigError, SweepConfig  # noqa: E402
from lora_sweep.driver import check_study, study_storage  # noqa: E402
from lora_sweep.folder import FINAL_METRICS_FILE, REPORT_DIR, STUDY_FILE, TUNE_DIR_NAME  # noqa: E402
from lora_sweep.pipeline import load_sweep  # noqa: E402
from lora_sweep.results import (parse_shape, read_json, read_leaderboard, replace_folder, rewritten_by_resume,  # noqa: E402
                           write_atomically)
from lora_sweep.trial_report import STEP  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class Figure:
    file: str
    title: str
    caption: str


@dataclass
class ReportResult:
    index: Path
    figures: list[Figure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # figure title -> why it could not be drawn


class _Scores(BaseModel):
    loss: float
    exact_match: Optional[float]  # None: text data, nothing answered
    examples: int


class _TestSplit(BaseModel):
    base: _Scores
    tuned: _Scores


class _FinalMetrics(BaseModel):
    """What the report reads of final_metrics.json (the export writes more, which is not checked here)."""

    test: _TestSplit
    params: dict[str, Any] = {}


def read_final_metrics(sweep_dir: Path) -> dict[str, Any] | None:
    """final_metrics.json (None before the final evaluation has run); a damaged one is a ConfigError naming it."""
    path = Path(sweep_dir) / FINAL_METRICS_FILE
    if not path.exists():
        return None
    remedy = rewritten_by_resume(sweep_dir)
    final = read_json(path, remedy)
    parse_shape(_FinalMetrics, final, path, remedy)
    return final


def _result_rows(path: Path) -> list[dict[str, Any]]:
    """One trial's reports from Tune's result.json, one JSON object per line. A last line without its newline
    is one Tune is writing (or was, when it was killed): it is left out, not refused."""
    remedy = "it is Ray Tune's log of one trial's reports: fix or delete that line"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.reason if isinstance(error, UnicodeDecodeError) else error.strerror
        raise ConfigError([f"cannot read it ({reason}); restore it from a copy"], str(path)) from None
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ConfigError([f"line {number}: not valid JSON ({error.msg}); {remedy}"], str(path)) from None
        if not isinstance(row, dict) or "trial_id" not in row:
            raise ConfigError([f"line {number}: must be a JSON object with a `trial_id`; {remedy}"], str(path))
        rows.append(row)
    return rows


def trial_histories(sweep_dir: Path) -> dict[str, pd.DataFrame]:
    """Every report of every trial, by trial id, from Tune's result.json files (one JSON object per line)."""
    histories = {}
    for path in sorted((Path(sweep_dir) / TUNE_DIR_NAME).glob("*/result.json")):
        rows = _result_rows(path)
        if rows:
            histories[str(rows[0]["trial_id"])] = pd.DataFrame(rows)
    return histories


def _save(figure: Any, path: Path, width: float = 9) -> None:
    figure.set_size_inches(width, 5.5)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _optuna_figure(plot: Callable[..., Any], study: Optional[optuna.Study], **kwargs: Any) -> Any:
    if study is None:  # the report draws these figures only when the study has finished trials
        raise ValueError("no Optuna study to plot")
    axes = plot(study, **kwargs)
    axes = axes.flatten()[0] if hasattr(axes, "flatten") else axes
    return axes.get_figure()


def learning_curves(histories: dict[str, pd.DataFrame], board: pd.DataFrame, metric: str) -> Any:
    status = dict(zip(board["trial_id"].astype(str), board["status"], strict=True)) if len(board) else {}
    figure, axes = plt.subplots()
    colours = {"completed": "tab:blue", "stopped early": "tab:gray", "errored": "tab:red"}
    for trial_id, history in histories.items():
        if metric not in history or STEP not in history:  # e.g. a trial that failed before its first evaluation
            continue
        usable = history[history[metric].map(lambda v: isinstance(v, (int, float)) and math.isfinite(v))]
        if usable.empty:
            continue
        state = status.get(trial_id, "completed")
        axes.plot(usable[STEP], usable[metric], color=colours.get(state, "tab:blue"),
                  alpha=0.9 if state == "completed" else 0.6, linewidth=1.2)
        if state != "completed":  # where ASHA stopped it, or where it failed
            axes.plot(usable[STEP].iloc[-1], usable[metric].iloc[-1], marker="x", color=colours[state], markersize=8)
    for state, colour in colours.items():
        axes.plot([], [], color=colour, marker="x" if state != "completed" else None, label=state)
    axes.set_xlabel("training step")
    axes.set_ylabel(f"validation {metric}")
    axes.set_title(f"Learning curves of all {len(histories)} trials (x: stopped early or errored)")
    axes.legend()
    axes.grid(alpha=0.3)
    return figure


def pareto_figure(board: pd.DataFrame, metric: str, cost: str, promoted: str | None) -> Any:
    """Every trial's best metric against its cost; the Pareto front joined by a line, the promoted trial ringed."""
    figure, axes = plt.subplots()
    cost_column, metric_column = f"best_step_{cost}", f"best_{metric}"
    usable = board[board[metric_column].notna()]
    others, front = usable[~usable["pareto"].astype(bool)], usable[usable["pareto"].astype(bool)]
    axes.scatter(others[cost_column], others[metric_column], color="tab:gray", label="dominated", alpha=0.7)
    front = front.sort_values(cost_column)
    axes.plot(front[cost_column], front[metric_column], color="tab:blue", marker="o", label="Pareto front")
    for _, row in front.iterrows():
        axes.annotate(str(row["trial_id"]), (row[cost_column], row[metric_column]), fontsize=8,
                      textcoords="offset points", xytext=(4, 4))
    chosen = usable[usable["trial_id"].astype(str) == str(promoted)]
    if len(chosen):
        axes.scatter(chosen[cost_column], chosen[metric_column], s=220, facecolors="none", edgecolors="tab:green",
                     linewidths=2, label="promoted")
    axes.set_xlabel(f"{cost} (at the trial's best step, lower is better)")
    axes.set_ylabel(f"best validation {metric}")
    axes.set_title(f"{len(front)} of {len(usable)} trials on the Pareto front of {metric} and {cost}")
    axes.legend()
    axes.grid(alpha=0.3)
    return figure


def best_vs_base(final: Optional[dict[str, Any]]) -> Any:
    if final is None:  # the report draws this figure only once final_metrics.json exists
        raise ValueError("no final evaluation to plot")
    test = final["test"]
    answered = test["tuned"].get("exact_match") is not None  # text data answers nothing: loss alone
    figure, axes_row = plt.subplots(1, 2 if answered else 1, squeeze=False)
    loss_axes = axes_row[0][0]
    names = ["base", "tuned"]
    loss_axes.bar(names, [test[n]["loss"] for n in names], color=["tab:gray", "tab:green"])
    loss_axes.set_title(f"test loss ({test['tuned']['examples']} examples, lower is better)")
    panels = [(loss_axes, "loss")]
    if answered:
        match_axes = axes_row[0][1]
        match_axes.bar(names, [test[n]["exact_match"] for n in names], color=["tab:gray", "tab:green"])
        match_axes.set_title("test exact match (higher is better)")
        match_axes.set_ylim(0, max(0.05, max(test[n]["exact_match"] for n in names) * 1.2))
        panels.append((match_axes, "exact_match"))
    for axes, key in panels:
        for x, name in enumerate(names):
            axes.annotate(f"{test[name][key]:.3f}", (x, test[name][key]), ha="center", va="bottom")
    figure.suptitle("Best trial vs the untuned base model on the held-out test split")
    return figure


def _read_study(sweep_dir: Path, name: str) -> optuna.Study | None:
    """The sweep's Optuna study, checked first and opened without writing; None before the sweep made it."""
    if not (sweep_dir / STUDY_FILE).exists():
        return None
    check_study(sweep_dir, name)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        return optuna.load_study(study_name=name, storage=study_storage(sweep_dir, create_tables=False))
    except KeyError:  # the database is there, the study not yet: the sweep stopped before its searcher started
        return None


def write_report(sweep_dir: Path) -> ReportResult:
    """Draw every figure the sweep has data for into SWEEP_DIR/report/ and write index.html next to them.

    Every input is read and checked before anything is written, and the page is built in a hidden staging
    folder that replaces report/ only once complete: a refused or failed report leaves no files behind.
    """
    sweep_dir = Path(sweep_dir)
    config, _ = load_sweep(sweep_dir)
    metric = config.search.metric
    board = read_leaderboard(sweep_dir, required=("trial_id", "status", f"best_{metric}"))
    histories = trial_histories(sweep_dir)
    final = read_final_metrics(sweep_dir)
    study = _read_study(sweep_dir, config.name)
    out, staging = sweep_dir / REPORT_DIR, sweep_dir / f".{REPORT_DIR}.tmp"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as error:
        raise ConfigError([f"cannot write {REPORT_DIR}/ here ({error.strerror or error}); make the folder writable, "
                           "or report a copy of it"], str(sweep_dir)) from None
    try:
        result = _draw(config, board, histories, final, study, staging)
        write_atomically(staging / "index.html", _page(config.name, result, board, final, metric))
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.index = out / "index.html"
    return result


def _draw(config: SweepConfig, board: pd.DataFrame, histories: dict[str, pd.DataFrame], final: dict[str, Any] | None,
          study: optuna.Study | None, out: Path) -> ReportResult:
    """Every figure the inputs allow, as PNG files in `out`; the ones that cannot be drawn, with the reason."""
    metric = config.search.metric
    result = ReportResult(index=out / "index.html")
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE] if study else []
    cost = config.search.also_minimize
    # A two-objective study: Optuna's single-value plots are drawn for the metric, its first objective.
    target = {"target": lambda t: t.values[0], "target_name": metric} if study and len(study.directions) > 1 else {}

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the plots are "experimental"
    plots: list[tuple[str, str, str, Callable[[], Any], str]] = [
        ("optimization_history.png", "Optimisation history",
         f"{metric} of every trial in the order the sampler proposed them, with the best so far.",
         lambda: _optuna_figure(optuna.visualization.matplotlib.plot_optimization_history, study, **target),
         "" if completed else "no trial has finished"),
        ("param_importances.png", "Hyperparameter importances",
         f"How much of the variation in {metric} each hyperparameter explains (Optuna's fANOVA).",
         lambda: _optuna_figure(optuna.visualization.matplotlib.plot_param_importances, study, **target),
         "" if len(completed) >= 2 and len({k for t in completed for k in t.params}) >= 1
         else "needs at least 2 finished trials with searched parameters"),
        ("parallel_coordinates.png", "Parallel coordinates",
         f"Each line is a trial: its hyperparameters and its {metric} (darker is better).",
         lambda: _optuna_figure(optuna.visualization.matplotlib.plot_parallel_coordinate, study, **target),
         "" if completed and any(t.params for t in completed) else "no finished trial with searched parameters"),
        ("learning_curves.png", "Learning curves",
         f"Validation {metric} by training step for every trial; an x marks a trial ASHA stopped early "
         "(grey) or one that failed (red).",
         lambda: learning_curves(histories, board, metric), "" if histories else "no trial has reported yet"),
        *([("pareto_front.png", "Pareto front",
            f"Each trial's best validation {metric} against its {cost}; the promoted trial is ringed: the lowest "
            f"{cost} within {config.search.pareto_tolerance:g} (relative) of the best {metric}.",
            lambda: pareto_figure(board, metric, cost, final.get("trial_id") if final else None),
            "" if len(board) and {"pareto", f"best_step_{cost}"} <= set(board.columns) else "no trial has ended")]
          if cost else []),
        ("best_vs_base.png", "Best vs base on the test split",
         "The promoted checkpoint against the untuned base model on the held-out test split.",
         lambda: best_vs_base(final), "" if final else "the sweep has not finished its final evaluation"),
    ]
    for file, title, caption, draw, missing in plots:
        if missing:
            result.skipped[title] = missing
            continue
        try:
            _save(draw(), out / file, width=14 if file.startswith("parallel") else 9)
        except (ValueError, RuntimeError, TypeError) as error:  # e.g. importances when every trial scored the same
            result.skipped[title] = f"could not be drawn: {error}"
            log.warning("report: %s could not be drawn: %s", title, error)
            continue
        result.figures.append(Figure(file, title, caption))
    return result


def _page(name: str, result: ReportResult, board: pd.DataFrame, final: dict[str, Any] | None, metric: str) -> str:
    e = html.escape
    parts = [
        "<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>Sweep report: {e(name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
        "figure{margin:2em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#555}"
        "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px}</style>",
        "</head><body>", f"<h1>Sweep report: {e(name)}</h1>",
    ]
    if final:
        best, test = final.get("params", {}), final["test"]
        parts.append(
            f"<p>Best trial <b>{e(str(final.get('trial_id')))}</b> at step {final.get('step')}: test loss "
            f"{test['base']['loss']:.4f} &rarr; <b>{test['tuned']['loss']:.4f}</b>"
            + (f", exact match {test['base']['exact_match']:.3f} &rarr; <b>{test['tuned']['exact_match']:.3f}</b>"
               if test['tuned'].get('exact_match') is not None else "") + ".</p>"
        )
        parts.append("<p>" + ", ".join(f"<code>{e(k)}={e(f'{v:.4g}' if isinstance(v, float) else str(v))}</code>"
                                       for k, v in best.items()) + "</p>")
        task = final.get("task_metrics") or {}
        if isinstance(task, dict) and task:
            rows = "".join(
                f"<tr><td>{e(str(name))}</td><td>{d.get('base', float('nan')):.4g}</td><td>{d.get('tuned', float('nan')):.4g}"
                f"</td><td>{d.get('difference', float('nan')):+.4g} [{d.get('low', float('nan')):+.4g}, "
                f"{d.get('high', float('nan')):+.4g}]</td></tr>" for name, d in task.items() if isinstance(d, dict))
            parts.append("<h2>Task metrics on the test split</h2><table><tr><th>metric</th><th>base</th><th>tuned</th>"
                         f"<th>tuned - base [95% paired bootstrap interval]</th></tr>{rows}</table>")
    for figure in result.figures:
        parts.append(f"<figure><h2>{e(figure.title)}</h2><img src='{e(figure.file)}' alt='{e(figure.title)}'>"
                     f"<figcaption>{e(figure.caption)}</figcaption></figure>")
    for title, why in result.skipped.items():
        parts.append(f"<p><i>{e(title)}: not drawn ({e(why)}).</i></p>")
    if len(board):
        table = board.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}")
        parts.append(f"<h2>Leaderboard</h2><div style='overflow-x:auto'>{table}</div>")  # wide: scroll, not stretch
    parts.append("</body></html>")
    return "\n".join(parts)
