"""Task metrics of generated answers (`evaluation.metrics`): the built-ins, a user's own `module:function`, and
the paired bootstrap interval of a tuned-minus-base difference.

Built-ins: `exact_match` (the stripped answer equals the reference), `token_f1` (SQuAD's token F1), `rouge_l`
(rouge-score's ROUGE-L F-measure, Google's reference implementation), `bleu` and `chrf` (sacrebleu's corpus BLEU and
chrF, on its 0-100 scale). A custom metric is `module:function` (an importable module) or `path/to/file.py:function`,
taking `(predictions: list[str], references: list[str])` and returning a float, or a dict of floats (each key a
metric of its own). It is imported once per process, and called once on a sample before anything runs, so that a
metric that cannot be imported or returns something else is a config error, not a failed sweep.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import math
import numbers
import re
import string
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lora_sweep.config import ConfigError, cut
from lora_sweep.trial_report import TASK_METRICS

BUILT_IN_METRICS = TASK_METRICS  # their names are defined once, with the other report keys
Scores = dict[str, float]


def _exact(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """The share of answers that equal their reference, outer white space aside (as the final evaluation always did)."""
    return _mean([_exact(p, r) for p, r in zip(predictions, references, strict=True)])


def _squad_tokens(text: str) -> list[str]:
    """SQuAD v1.1's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _f1(prediction: str, reference: str) -> float:
    predicted, expected = _squad_tokens(prediction), _squad_tokens(reference)
    if not predicted or not expected:  # SQuAD v2's rule: both empty (after normalising) agree
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: list[str], references: list[str]) -> float:
    """SQuAD's token F1 (v2's official script: an answer and a reference that both normalise to nothing score 1),
    averaged over examples. Written out (it is the 10-line definition of that script): the packages that carry it
    load the script from the network at run time."""
    return _mean([_f1(p, r) for p, r in zip(predictions, references, strict=True)])


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def _rouge_one(prediction: str, reference: str) -> float:
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), averaged over examples."""
    return _mean([_rouge_one(p, r) for p, r in zip(predictions, references, strict=True)])


def bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) with its default 13a tokenizer."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def chrf(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus chrF (0-100): character n-gram F-score, kinder than BLEU to short answers."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(predictions, [references]).score)


BUILT_IN: dict[str, Callable[[list[str], list[str]], float]] = {
    "exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l, "bleu": bleu, "chrf": chrf}
# The built-ins that are a mean over examples, by their per-example score: the bootstrap scores each example once
# and resamples the scores (corpus metrics, BLEU, chrF and a user's own, are recomputed on every resample).
PER_EXAMPLE: dict[str, Callable[[str, str], float]] = {"exact_match": _exact, "token_f1": _f1, "rouge_l": _rouge_one}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@lru_cache(maxsize=None)
def load_custom(spec: str) -> Callable[..., Any]:
    """`module:function` or `file.py:function`, imported once per process; a ConfigError naming the spec otherwise."""
    where, _, name = spec.rpartition(":")
    problem = f"`evaluation.metrics`: {spec!r}"
    if not where or not name.isidentifier():
        raise ConfigError([f"{problem} is not a built-in metric ({', '.join(BUILT_IN_METRICS)}) nor module:function"],
                          "evaluation")
    try:
        if where.endswith(".py"):
            path = Path(where)
            module_spec = importlib.util.spec_from_file_location(f"lora_sweep_metric_{path.stem}", path)
            if module_spec is None or module_spec.loader is None or not path.is_file():
                raise ImportError(f"no such file: {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as error:  # the user's module may fail in any way while it is imported
        raise ConfigError([f"{problem}: cannot import {where!r} ({type(error).__name__}: {cut(str(error), 200)})"],
                          "evaluation") from None
    function: Callable[..., Any] | None = getattr(module, name, None)
    if not callable(function):
        raise ConfigError([f"{problem}: {where!r} has no function {name!r}"], "evaluation")
    return function


def _is_number(value: Any) -> bool:
    """A float, an int or a numpy scalar of either; not a bool (a metric returning True is a mistake)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _as_scores(spec: str, value: Any) -> Scores:
    """A metric's return value as {name: float}; a ConfigError naming the spec when it is something else."""
    name = spec.rpartition(":")[2] if ":" in spec else spec
    if not _is_number(value) and not isinstance(value, dict):
        raise ConfigError([f"`evaluation.metrics`: {spec!r} returned {cut(repr(value), 80)}; a metric returns a float "
                           "or a dict of floats"], "evaluation")
    if isinstance(value, dict):
        bad = {k: v for k, v in value.items() if not isinstance(k, str) or not _is_number(v)}
        if bad or not value:
            raise ConfigError([f"`evaluation.metrics`: {spec!r} returned {cut(repr(value), 80)}; a dict must map "
                               "names to floats"], "evaluation")
        return {k: float(v) for k, v in value.items()}
    return {name: float(value)}


def compute(specs: list[str], predictions: list[str], references: list[str]) -> Scores:
    """Every configured metric of the answers, by metric name."""
    return {name: value for scores in scores_by_spec(specs, predictions, references) for name, value in scores.items()}


def scores_by_spec(specs: list[str], predictions: list[str], references: list[str]) -> list[Scores]:
    """Each configured metric's scores, in the order of `specs`."""
    found: list[Scores] = []
    for spec in specs:
        function = BUILT_IN.get(spec) or load_custom(spec)
        try:
            value = function(list(predictions), list(references))
        except ConfigError:
            raise
        except Exception as error:  # a user's metric failing on real answers: say which, and why
            raise RuntimeError(f"evaluation.metrics: {spec!r} failed: {type(error).__name__}: {error}") from error
        found.append(_as_scores(spec, value))
    return found


def metric_names(specs: list[str]) -> list[str]:
    """The names the configured metrics report (a custom one called once on a sample to learn them)."""
    return [name for scores in scores_by_spec(specs, ["a sample answer"], ["a sample answer"]) for name in scores]


@dataclass(frozen=True)
class Difference:
    """tuned - base of one metric, with its paired bootstrap 95% interval."""

    base: float
    tuned: float
    difference: float
    low: float
    high: float
    resamples: int


def paired_bootstrap(specs: list[str], base: list[str], tuned: list[str], references: list[str],
                     resamples: int = 1000, seed: int = 0) -> dict[str, Difference]:
    """For every metric: tuned minus base on the same examples, and the 2.5th and 97.5th percentiles of that
    difference over `resamples` resamples of the examples (with replacement; both models scored on the same
    resample, so the interval is of the difference, not of each score)."""
    observed_base, observed_tuned = compute(specs, base, references), compute(specs, tuned, references)
    rng = np.random.default_rng(seed)
    n = len(references)
    picks = [rng.integers(0, n, n) for _ in range(resamples if n else 0)]
    differences: dict[str, list[float]] = {name: [] for name in observed_base}
    for name, score in PER_EXAMPLE.items():
        if name in specs:  # each example scored once; a resample's score is the mean of its examples' scores
            gain = np.array([score(t, r) - score(b, r) for b, t, r in zip(base, tuned, references, strict=True)])
            differences[name] = [float(gain[picked].mean()) for picked in picks]
    recomputed = [spec for spec in specs if spec not in PER_EXAMPLE]
    for picked in picks if recomputed else []:
        expected = [references[i] for i in picked]
        b = compute(recomputed, [base[i] for i in picked], expected)
        t = compute(recomputed, [tuned[i] for i in picked], expected)
        for name in b:
            differences[name].append(t[name] - b[name])
    result = {}
    for name, values in differences.items():
        low, high = (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if values else (math.nan,) * 2
        result[name] = Difference(observed_base[name], observed_tuned[name], observed_tuned[name] - observed_base[name],
                                  low, high, len(values))
    return result


def check_metrics(specs: list[str], reserved: tuple[str, ...] = ()) -> list[str]:
    """Before anything runs: every metric imports and returns finite floats on a sample; none takes a reserved name."""
    try:
        samples = scores_by_spec(specs, ["a sample answer"], ["a sample answer"])
    except RuntimeError as error:  # the user's metric raised on the sample
        reason = cut(str(error).removeprefix("evaluation.metrics: "), 300)
        raise ConfigError([f"`evaluation.metrics`: {reason} (called on one sample answer before anything runs)"],
                          "evaluation") from None
    not_finite = {name: value for scores in samples for name, value in scores.items() if not math.isfinite(value)}
    if not_finite:
        raise ConfigError([f"`evaluation.metrics`: {not_finite} on a sample answer; a metric returns finite numbers "
                           "(a NaN or infinite score cannot rank trials)"], "evaluation")
    names = [name for scores in samples for name in scores]
    clashes = [name for name in names if name in reserved]
    if clashes:
        raise ConfigError([f"`evaluation.metrics`: a custom metric reports {clashes}, a name the engine reports "
                           "itself; rename its keys"], "evaluation")
    duplicates = [name for name, count in collections.Counter(names).items() if count > 1]
    if duplicates:
        raise ConfigError([f"`evaluation.metrics`: more than one metric reports {duplicates}; each name once"],
                          "evaluation")
    return names
