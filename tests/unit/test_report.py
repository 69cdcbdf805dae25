"""`sweep report`: figures from a sweep folder, and the page checked in a real headless Chromium."""

import json
import os
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

from lora_sweep.cli import app
from lora_sweep.config import config_to_yaml, load_config
from lora_sweep.driver import study_storage

FIGURES = {"optimization_history.png", "param_importances.png", "parallel_coordinates.png", "learning_curves.png",
           "best_vs_base.png"}


@pytest.fixture
def finished_sweep(raw_config, write_config, tmp_path) -> Path:
    """A sweep folder as a finished sweep leaves it: 4 trials (one stopped early, one errored), study, results."""
    config = load_config(write_config(raw_config))
    sweep_dir = config.sweep_dir
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "config.yaml").write_text(config_to_yaml(config))
    (sweep_dir / "provenance.json").write_text(json.dumps({"data_path": "unused"}))
    study = optuna.create_study(study_name=config.name, storage=study_storage(sweep_dir))
    rows = []
    for number, (lr, rank, losses, status) in enumerate([
        (1e-3, 4, [3.0, 2.5], "completed"), (1e-2, 8, [2.8, 2.2], "completed"),
        (1e-5, 4, [4.0], "stopped early"), (3e-2, 8, [3.5], "errored"),
    ]):
        trial = study.ask({"training.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
                           "lora.rank": optuna.distributions.CategoricalDistribution([4, 8])})
        trial_id = f"t{number}"
        results = sweep_dir / "tune" / f"trial_{trial_id}"
        results.mkdir(parents=True)
        lines = []
        for k, loss in enumerate(losses):
            trial.report(loss, 3 * (k + 1))
            lines.append(json.dumps({"trial_id": trial_id, "step": 3 * (k + 1), "eval_loss": loss}))
        (results / "result.json").write_text("\n".join(lines) + "\n")
        study.tell(trial, losses[-1])
        rows.append({"trial_id": trial_id, "status": status, "param:training.learning_rate": lr,
                     "param:lora.rank": rank, "best_eval_loss": min(losses), "steps_run": 3 * len(losses)})
    pd.DataFrame(rows).sort_values("best_eval_loss").to_csv(sweep_dir / "leaderboard.csv", index=False)
    test = {"base": {"loss": 6.9, "exact_match": 0.0, "examples": 10}, "tuned": {"loss": 3.1, "exact_match": 0.2, "examples": 10}}
    (sweep_dir / "final_metrics.json").write_text(json.dumps(
        {"trial_id": "t1", "step": 6, "params": {"training.learning_rate": 1e-2, "lora.rank": 8}, "test": test}))
    return sweep_dir


def test_report_writes_every_figure_and_a_page_that_links_them(finished_sweep):
    result = CliRunner().invoke(app, ["report", str(finished_sweep)])
    assert result.exit_code == 0, result.output
    report = finished_sweep / "report"
    assert FIGURES <= {p.name for p in report.glob("*.png")}
    for figure in FIGURES:
        assert (report / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (report / figure).stat().st_size > 5000
    page = (report / "index.html").read_text()
    assert all(f"src='{figure}'" in page for figure in FIGURES)
    assert "t1" in page and "3.1000" in page and "not drawn" not in page


def test_report_of_an_unfinished_sweep_says_what_it_left_out(finished_sweep):
    (finished_sweep / "final_metrics.json").unlink()
    result = CliRunner().invoke(app, ["report", str(finished_sweep)])
    assert result.exit_code == 0
    assert "not drawn: Best vs base on the test split (the sweep has not finished its final evaluation)" in result.output
    assert not (finished_sweep / "report" / "best_vs_base.png").exists()


def test_report_of_a_folder_that_is_no_sweep_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "is not a sweep folder" in result.output


CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"), reason="needs Chromium (apt-get install chromium); CI installs it")
def test_report_renders_in_headless_chromium_with_every_image_loaded(finished_sweep, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must have Chromium: .ci/run installs Debian's chromium"
    CliRunner().invoke(app, ["report", str(finished_sweep)])
    with sync_playwright() as playwright:
        # Flags that keep Chromium off the (closed) network and out of a sandbox it cannot have as root.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto((finished_sweep / "report" / "index.html").as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight])")
        heading = page.inner_text("h1")
        screenshot = tmp_path / "report.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert heading == "Sweep report: tiny"
    assert {src for src, *_ in images} == FIGURES
    for src, complete, width, height in images:
        assert complete and width >= 800 and height >= 400, src  # decoded, not a broken-image icon
    # The screenshot shows the figures: a full page, far taller than the viewport, and not blank.
    import matplotlib.image

    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[0] > 5 * 400 and pixels.shape[1] == 1100
    assert pixels[:, :, :3].std() > 0.05


def test_a_final_evaluation_of_text_data_draws_and_states_the_loss_alone():
    """Text data answers nothing (exact match None): the figure has the loss panel only, the page no exact match."""
    from lora_sweep.report import ReportResult, _page, best_vs_base

    scores = {"loss": 2.0, "perplexity": 7.4, "exact_match": None, "examples": 4, "response_tokens": 90}
    final = {"trial_id": "t0", "step": 6, "params": {}, "test": {"base": {**scores, "loss": 3.0}, "tuned": scores}}
    figure = best_vs_base(final)
    assert [axes.get_title() for axes in figure.axes] == ["test loss (4 examples, lower is better)"]
    page = _page("tiny", ReportResult(index=Path("index.html")), pd.DataFrame(), final, "eval_loss")
    assert "test loss 3.0000 &rarr; <b>2.0000</b>." in page and "exact match" not in page
