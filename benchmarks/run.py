"""lora-sweep benchmarks: one command, a table of ratios (median of repeats, each ratio measured in one run).

    python benchmarks/run.py [--repeats 3] [--only throughput,startup,efficiency,search,driver,disk] [--quick]

Sections (see BENCHMARKS.md for what each figure means and its target):
  throughput  tokens/s inside a trial vs a bare PEFT + torch loop on the same model and batches
  startup     seconds from a trial's start to its first optimizer step on a ~100M-parameter model:
              a worker's first trial (loads the model) vs its later trials (model kept, imports frozen out of GC)
  efficiency  `sweep`'s tuning phase vs the ideal (training time / slots) and vs a hand-written
              Ray Tune + Trainer sweep, for ~30 s and ~5 s trials
  search      the replay on every shipped learning-curve table: each method's compute to reach a target against
              random search (benchmarks/replay.py; writes benchmarks/results/)
  driver      1,000 trials of a trainable that trains nothing: driver overhead per trial, peak memory
  disk        bytes written per trial against the adapter's own size
  packing     tokens with a label per second, packed against padded, on data with a wide spread of lengths (one
              epoch each, the real trainable), and the wall time of the same 4-trial sweep packed and padded

Not a test: nothing here runs in CI. These machines are noisy, so every figure is
a ratio of two measurements taken back to back, and the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.yaml"
HERE = Path(__file__).resolve().parent


def median(values: list[float]) -> float:
    return statistics.median(values)


def python(code: str, *args: str, timeout: int = 1800) -> dict:
    """Run a benchmark step in a fresh interpreter (clean imports, clean Ray) and read its JSON line."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "LORA_SWEEP_TEST_HOOKS": "armed", "LORA_SWEEP_TUNE_VERBOSE": "0", "PYTHONPATH": str(ROOT)})
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark step failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# --- throughput -------------------------------------------------------------------------------

THROUGHPUT = r'''
import json, sys, time, tempfile, torch, peft
from pathlib import Path
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq
from lora_sweep.config import load_config
from lora_sweep.data import prepare_data, load_prepared, IGNORE_INDEX, MODEL_COLUMNS
from lora_sweep.lora import lora_settings
from lora_sweep.models import load_tokenizer, load_base_model
from lora_sweep.recipe import ListReporter, run_trial
steps = int(sys.argv[1])
config = load_config(sys.argv[2], [f"training.max_steps={steps}", f"training.eval_steps={steps}", "training.batch_size=16", "scheduler.type=none",
                                   "lora.target_modules=all-linear", "training.learning_rate=1e-3"])
torch.set_num_threads(1)
tokenizer = load_tokenizer(config)
data = prepare_data(config.data, tokenizer, config.seed, Path(tempfile.mkdtemp()))
reporter = ListReporter()
run_trial({}, config.model_dump(), str(data.path), reporter)
engine = reporter.reports[-1]["tokens_seen"] / reporter.reports[-1]["train_seconds"]
# The bare loop: same model, LoRA, batches (same collator, batch size, shuffling seed) and optimizer.
torch.manual_seed(config.seed)
base = load_base_model(config)
model = peft.get_peft_model(base, lora_settings(config.lora, base))
train = load_prepared(data.path)["train"].select_columns(MODEL_COLUMNS)
loader = DataLoader(train, batch_size=16, shuffle=True, collate_fn=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
                    generator=torch.Generator().manual_seed(config.seed))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train(); tokens = 0; seconds = 0.0; done = 0
while done < steps:
    for batch in loader:
        started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); optimizer.step(); optimizer.zero_grad()
        seconds += time.perf_counter() - started
        tokens += int(batch["attention_mask"].sum()); done += 1
        if done == steps: break
print(json.dumps({"engine": engine, "bare": tokens / seconds}))
'''


def bench_throughput(repeats: int, quick: bool) -> list[tuple[str, str, str]]:
    ratios, engine, bare = [], [], []
    for _ in range(repeats):
        result = python(THROUGHPUT, str(60 if quick else 200), str(DEMO))
        ratios.append(result["engine"] / result["bare"])
        engine.append(result["engine"])
        bare.append(result["bare"])
    return [("trainable throughput / bare PEFT loop", f"{median(ratios):.3f}",
             f"{median(engine):,.0f} vs {median(bare):,.0f} tokens/s, 1 thread; target >= 0.95")]


# --- start-up ---------------------------------------------------------------------------------

STARTUP = r'''
import json, sys, tempfile, torch
from pathlib import Path
from lora_sweep.config import load_config
from lora_sweep.data import prepare_data
from lora_sweep.testing.tiny_model import build_tiny_llama
from lora_sweep import models
from lora_sweep.models import load_tokenizer
from lora_sweep.recipe import ListReporter, run_trial
model_dir = Path(sys.argv[2])
if not (model_dir / "config.json").exists():
    build_tiny_llama(model_dir, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048, seed=0)
steps = int(sys.argv[1])
config = load_config(sys.argv[3], [f"model.path={model_dir}", f"training.max_steps={steps}", f"training.eval_steps={steps}",
                                   "training.batch_size=4", "training.eval_batch_size=4", "resources.cpu=2", "scheduler.type=none"])
params = sum(p.numel() for p in models.load_base_model(config).parameters())
data = prepare_data(config.data, load_tokenizer(config), config.seed, Path(tempfile.mkdtemp()))
val = __import__("datasets").load_from_disk(str(data.path))
out = {"params": params}
for label, keep in (("cold", False), ("warm", True)):
    models._BASE_MODELS.clear()
    if keep:  # a worker that ran a trial before: its base model is kept
        run_trial({}, config.model_dump(), str(data.path), ListReporter())
    start = __import__("time").perf_counter()
    reporter = ListReporter()
    run_trial({}, config.model_dump(), str(data.path), reporter)
    total = __import__("time").perf_counter() - start
    out[label] = {"startup": reporter.reports[-1]["startup_seconds"], "trial": total}
print(json.dumps(out))
'''


def bench_startup(repeats: int, quick: bool) -> list[tuple[str, str, str]]:
    model_dir = Path(tempfile.gettempdir()) / "lora-sweep-bench-100m"
    cold, warm, params = [], [], 0
    for _ in range(repeats):
        result = python(STARTUP, str(2 if quick else 5), str(model_dir), str(DEMO))
        params = result["params"]
        cold.append(result["cold"])
        warm.append(result["warm"])
    share = lambda runs: median([r["startup"] / r["trial"] for r in runs])  # noqa: E731
    return [
        ("trial start-up share, first trial on a worker", f"{share(cold):.3f}",
         f"{median([r['startup'] for r in cold]):.2f} s of {median([r['trial'] for r in cold]):.1f} s, {params / 1e6:.0f}M params"),
        ("trial start-up share, later trials on that worker", f"{share(warm):.3f}",
         f"{median([r['startup'] for r in warm]):.2f} s of {median([r['trial'] for r in warm]):.1f} s; "
         f"later/first {median([w['startup'] / c['startup'] for w, c in zip(warm, cold, strict=True)]):.2f}"),
    ]


# --- engine efficiency ------------------------------------------------------------------------

# A sweep through the engine's own steps up to the tuning phase: config, checks, data, Ray.
SWEEP_SETUP = r'''
import json, sys, time
from pathlib import Path
from lora_sweep.config import load_config
from lora_sweep.pipeline import prepare_sweep_dir, _write_data_and_provenance
from lora_sweep.preflight import preflight
from lora_sweep.storage import SweepFolder
from lora_sweep.driver import run_sweep, start_ray
config = load_config(sys.argv[1], sys.argv[3:] + [f"output_dir={sys.argv[2]}"])
checked = preflight(config)
space, tokenized = checked.space, checked.tokenized
sweep_dir = prepare_sweep_dir(config, overwrite=True)
record = _write_data_and_provenance(config, tokenized, sweep_dir)
start_ray(config)
'''

ENGINE = SWEEP_SETUP + r'''
started = time.perf_counter()
grid = run_sweep(config, space, Path(record["data_path"]), SweepFolder.of(config))
wall = time.perf_counter() - started
print(json.dumps({"wall_seconds": wall, "train_seconds": [r.metrics.get("train_seconds", 0.0) for r in grid],
                  "trial_dirs": [str(r.path) for r in grid]}))
'''


def efficiency_overrides(steps: int, trials: int) -> list[str]:
    # Fixed-length trials (no ASHA) so that both sweeps do the same training.
    return [f"training.max_steps={steps}", f"training.eval_steps={max(steps // 4, 1)}", f"search.num_trials={trials}",
            "search.max_concurrent_trials=2", "scheduler.type=none", "ray.num_cpus=2", "search.space=lr_only",
            "search.parameters={}", "training.batch_size=16"]


def bench_efficiency(repeats: int, quick: bool) -> list[tuple[str, str, str]]:
    rows = []
    cases = [("~5 s trials", 80, 6)] if quick else [("~30 s trials", 480, 4), ("~5 s trials", 80, 8)]
    for label, steps, trials in cases:
        of_ideal, vs_hand, walls = [], [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as out:
                overrides = efficiency_overrides(steps, trials)
                ours = python(ENGINE, str(DEMO), out, *overrides)
                hand = json.loads([line for line in subprocess.run(
                    [sys.executable, str(HERE / "handwritten_sweep.py"), str(DEMO), out, *overrides],
                    capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                ).stdout.splitlines() if line.startswith("{")][-1])
            ideal = sum(ours["train_seconds"]) / 2
            of_ideal.append(ideal / ours["wall_seconds"])
            vs_hand.append(hand["wall_seconds"] / ours["wall_seconds"])
            walls.append((ours["wall_seconds"], hand["wall_seconds"]))
        rows.append((f"engine efficiency vs ideal, {label}", f"{median(of_ideal):.3f}",
                     f"{trials} trials x {steps} steps on 2 slots; target >= 0.85"))
        rows.append((f"hand-written sweep time / engine time, {label}", f"{median(vs_hand):.3f}",
                     f"median walls {median([w[0] for w in walls]):.1f} s vs {median([w[1] for w in walls]):.1f} s; "
                     "target > 1"))
    return rows


# --- search efficiency ------------------------------------------------------------------------

TABLES = HERE / "tables"
SEARCH_RESULTS = HERE / "results"


def bench_search(repeats: int, quick: bool) -> list[tuple[str, str, str]]:
    """The replay (benchmarks/replay.py) on every shipped learning-curve table: every method, 200 seeds (20 with
    --quick), 2 workers, 64-trial sweeps. Writes <table>.json and <table>_regret.png under benchmarks/results/."""
    import replay

    SEARCH_RESULTS.mkdir(exist_ok=True)
    rows = []
    for table in sorted(TABLES.glob("*.parquet")):
        summary = replay.replay(str(table), list(replay.METHODS), workers=2, trials=64, seeds=20 if quick else 200,
                                jobs=os.cpu_count() or 1, plot=SEARCH_RESULTS / f"{table.stem}_regret.png")
        (SEARCH_RESULTS / f"{table.stem}.json").write_text(json.dumps(summary, indent=1))
        print(f"\n{table.name}\n{replay.markdown(summary)}\n", flush=True)
        for row in summary["results"]:
            if row["method"] in ("default", "ray_asha_random") and row["target"] == "top2%":
                rows.append((f"search, {table.stem}: random compute / {row['method']} compute, top 2%",
                             f"{row['median_ratio']:.2f}",
                             f"95% interval [{row['ci95_low']}, {row['ci95_high']}], P(>1) {row['p_better']}, "
                             f"success {row['success_rate']}; {summary['seeds']} replay seeds"))
    return rows


# --- driver scale -----------------------------------------------------------------------------

DRIVER = r'''
import json, resource, sys, time
from pathlib import Path
from ray import tune
from lora_sweep.config import load_config
from lora_sweep.pipeline import prepare_sweep_dir, _write_data_and_provenance
from lora_sweep.preflight import preflight
from lora_sweep.storage import SweepFolder
from lora_sweep.driver import run_sweep, start_ray

def no_training(params, base_config, data_path):
    tune.report({"eval_loss": float(params.get("training.learning_rate", 0.0)), "step": 1})

trials = int(sys.argv[3])
config = load_config(sys.argv[1], [f"output_dir={sys.argv[2]}", f"search.num_trials={trials}", "search.space=lr_only",
                                   "ray.num_cpus=2", "training.max_steps=1", "training.eval_steps=1",
                                   "scheduler.grace_period=1"])
checked = preflight(config)
space, tokenized = checked.space, checked.tokenized
sweep_dir = prepare_sweep_dir(config, overwrite=True)
record = _write_data_and_provenance(config, tokenized, sweep_dir)
start_ray(config)
started = time.perf_counter()
grid = run_sweep(config, space, Path(record["data_path"]), SweepFolder.of(config), trial_function=no_training)
wall = time.perf_counter() - started
print(json.dumps({"trials": len(grid), "wall_seconds": wall,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def bench_driver(repeats: int, quick: bool) -> list[tuple[str, str, str]]:
    trials = 100 if quick else 1000
    with tempfile.TemporaryDirectory() as out:
        result = python(DRIVER, str(DEMO), out, str(trials), timeout=3600)  # one run: 1,000 trials is the long part
    per_trial = result["wall_seconds"] / result["trials"]
    return [(f"driver overhead per trial, {result['trials']} no-op trials", f"{per_trial:.3f} s",
             f"peak driver RSS {result['peak_rss_mb']:.0f} MB, TPE + ASHA + SQLite study; target < 0.3 s")]


# --- disk -------------------------------------------------------------------------------------

def bench_disk(repeats: int, quick: bool) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory() as out:
        steps = 80
        ours = python(ENGINE, str(DEMO), out, *efficiency_overrides(steps, 2), "checkpoints.keep=1")
        trial_dirs = [Path(p) for p in ours["trial_dirs"]]
        checkpoint = next(p for d in trial_dirs for p in sorted(d.glob("checkpoint_*")))
        adapter = (checkpoint / "adapter_model.safetensors").stat().st_size
        checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
        reports = 4  # eval_steps = steps / 4
        logs = median([sum(f.stat().st_size for f in d.glob("*") if f.is_file()) for d in trial_dirs])
        tb = sum(f.stat().st_size for f in (Path(out) / "demo" / "tensorboard").rglob("*") if f.is_file()) / len(trial_dirs)
    written = reports * checkpoint_bytes + logs + tb
    return [("bytes written per trial / adapter size", f"{written / adapter:.1f}",
             f"{reports} checkpoints x {checkpoint_bytes:,} B (adapter {adapter:,} B + optimizer state) "
             f"+ {logs:,.0f} B Tune logs + {tb:,.0f} B TensorBoard")]


# --- packing ----------------------------------------------------------------------------------

PACKING = r'''
import json, math, random, sys, tempfile, time
from pathlib import Path
import ray
from lora_sweep.config import load_config
from lora_sweep.data import prepare_data, load_prepared
from lora_sweep.models import load_tokenizer
from lora_sweep.recipe import ListReporter, run_trial
from lora_sweep.pipeline import run
folder = Path(tempfile.mkdtemp())
rng = random.Random(0)
# Prompt/completion pairs whose lengths spread from a few tokens to ~450 (byte-level tokens: one per character).
rows = []
for i in range(int(sys.argv[2])):
    word = "".join(rng.choice("abcdefghij") for _ in range(int(math.exp(rng.uniform(math.log(3), math.log(440))))))
    rows.append({"prompt": f"Copy {i}: ", "completion": word})
(folder / "spread.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
out = {}
for packing in (False, True):
    overrides = [f"data.files=[{folder / 'spread.jsonl'}]", "data.template=null", "data.max_length=512", f"data.packing={str(packing).lower()}",
                 "training.batch_size=8", "training.eval_batch_size=32", "scheduler.type=none", "search.space=null",
                 "search.parameters={}", "resources.cpu=1", f"output_dir={folder / ('packed' if packing else 'padded')}"]
    config = load_config(sys.argv[1], overrides)
    tokenizer = load_tokenizer(config)
    data = prepare_data(config.data, tokenizer, config.seed, folder / f"data-{packing}")
    train = load_prepared(data.path)["train"]
    labelled = sum(sum(label != -100 for label in row) for row in train["labels"])
    steps = math.ceil(len(train) / 8)  # one epoch
    trial = load_config(sys.argv[1], overrides + [f"training.max_steps={steps}", f"training.eval_steps={steps}"])
    reporter = ListReporter()
    run_trial({}, trial.model_dump(), str(data.path), reporter)
    seconds = reporter.reports[-1]["train_seconds"]
    # The same sweep: 4 trials, one epoch each, 2 at a time, from preparing the data to the export.
    sweep = load_config(sys.argv[1], overrides + [f"training.max_steps={steps}", f"training.eval_steps={max(1, steps // 2)}",
                                                   "search.num_trials=4", "search.max_concurrent_trials=2",
                                                   "search.parameters={training.learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}",
                                                   "evaluation.max_examples=16"])
    started = time.perf_counter()
    run(sweep)
    ray.shutdown()
    out["packed" if packing else "padded"] = {"rows": len(train), "steps": steps, "labelled": labelled,
                                              "train_seconds": seconds, "sweep_seconds": time.perf_counter() - started}
print(json.dumps(out))
'''


def bench_packing(repeats: int, quick: bool) -> list[tuple[str, str, str]]:
    speed, wall, last = [], [], {}
    for _ in range(repeats):
        last = python(PACKING, str(DEMO), str(300 if quick else 1200))
        padded, packed = last["padded"], last["packed"]
        speed.append((packed["labelled"] / packed["train_seconds"]) / (padded["labelled"] / padded["train_seconds"]))
        wall.append(padded["sweep_seconds"] / packed["sweep_seconds"])
    padded, packed = last["padded"], last["packed"]
    return [("packed / padded: labelled tokens per second", f"{median(speed):.2f}",
             f"one epoch of {padded['rows']:,} examples (lengths 3..440 tokens, log-uniform): {padded['steps']} padded "
             f"steps vs {packed['steps']} packed ({packed['rows']:,} rows of <= 512 tokens); target >= 1.5"),
            ("packed / padded: the same 4-trial sweep's wall time (speed-up)", f"{median(wall):.2f}",
             f"{median([padded['sweep_seconds']]):.0f} s padded vs {packed['sweep_seconds']:.0f} s packed (last repeat), "
             "data to export")]


SECTIONS = {"throughput": bench_throughput, "startup": bench_startup, "efficiency": bench_efficiency,
            "search": bench_search, "driver": bench_driver, "disk": bench_disk, "packing": bench_packing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="smaller runs, to check the harness itself")
    args = parser.parse_args()
    rows = []
    started = time.perf_counter()
    for name in args.only.split(","):
        section_started = time.perf_counter()
        found = SECTIONS[name](args.repeats, args.quick)
        rows.extend(found)
        for row in found:
            print(f"{row[0]:<58} {row[1]:>9}  {row[2]}", flush=True)
        print(f"  ({name}: {time.perf_counter() - section_started:.0f} s)", flush=True)
    print("\n| figure | value | detail |\n|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s, {args.repeats} repeats")


if __name__ == "__main__":
    main()
