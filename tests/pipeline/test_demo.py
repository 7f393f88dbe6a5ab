"""`repedit demo`: the whole pipeline on the default model with tiny settings, resume, and the report rendering in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from repedit.pipeline import DemoSettings, run_demo

TINY = DemoSettings(n_users=2, n_prompts=2, hold_out=3, pair_tokens=40, probe_every=10, layers=(9,), strengths=(0.5,), eval_tokens=8,
                    train_epochs=2)
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, default_model_and_tokenizer):
    from repedit.cli.main import main

    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), "--n-users", "2", "--n-prompts", "2", "--hold-out", "3", "--pair-tokens", "40", "--probe-every", "10",
                 "--layers", "9", "--strengths", "0.5", "--eval-tokens", "8", "--train-epochs", "2"]) == 0
    return out, out / "report.html"


@pytest.mark.default_model
def test_demo_writes_every_stage_and_the_report(demo_run):
    import gguf

    out, report = demo_run
    page = report.read_text()
    for heading in ("Where is personalisation represented?", "The latent space of the pairs", "Selected layer and strength per user",
                    "Held-out metrics per user", "Effect vs strength", "Sample answers", "Exports"):
        assert heading in page, heading
    assert len(page) > 1_000_000  # plotly.js embedded: opens offline
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert evaluation["summary"]["n_users"] == 2 and evaluation["settings"]["n_test_items"] == 6
    selection = json.loads((out / "store" / "selection.json").read_text())
    steered = [u for u, c in selection["choices"].items() if c["layer"] is not None]
    store_users = json.loads((out / "exports.json").read_text())["store_users"]
    assert sorted(store_users) == sorted(steered)
    for user in steered:  # one llama.cpp control vector per steered user, at the selected layer
        reader = gguf.GGUFReader(str(out / "gguf" / f"{user}.gguf"))
        assert [t.name for t in reader.tensors] == [f"direction.{selection['choices'][user]['layer']}"]


@pytest.mark.default_model
def test_demo_rerun_reuses_finished_stages(demo_run, capsys):
    out, _ = demo_run
    before = (out / "eval" / "eval.json").read_text()
    run_demo("smollm2-135m-instruct", out, TINY)
    printed = capsys.readouterr().out
    for stage in ("pairs", "probes", "select", "evaluate", "export"):
        assert f"[{stage}] done in an earlier run" in printed
    assert (out / "eval" / "eval.json").read_text() == before


def _chromium(args: list[str], home, timeout: int = 90) -> subprocess.CompletedProcess:
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=15000", *args]
    return subprocess.run(command, capture_output=True, timeout=timeout, env={**os.environ, "HOME": str(home)})


@pytest.mark.default_model
@pytest.mark.skipif(BROWSER is None, reason="chromium is not installed")
def test_every_figure_of_the_report_renders_in_headless_chromium(demo_run, tmp_path):
    """After plotly.js has run, every figure div holds a drawn SVG plot; the screenshot is not blank."""
    _, report = demo_run
    page = report.read_text()
    n_figures = len(re.findall(r'<div id="[^"]+" class="plotly-graph-div"', page))
    assert n_figures >= 7
    result = _chromium(["--dump-dom", report.resolve().as_uri()], tmp_path)
    dom = result.stdout.decode(errors="replace")
    # Plotly replaces each empty graph div by one with class "js-plotly-plot" holding an <svg class="main-svg">.
    drawn = len(re.findall(r'class="plotly-graph-div js-plotly-plot"', dom))
    assert drawn == n_figures, f"{drawn} of {n_figures} figures rendered; stderr: {result.stderr.decode(errors='replace')[-1000:]}"
    assert dom.count('class="main-svg"') >= n_figures
    screenshot = tmp_path / "shot.png"
    _chromium(["--window-size=1100,1600", f"--screenshot={screenshot}", report.resolve().as_uri()], tmp_path)
    assert screenshot.exists() and screenshot.stat().st_size > 50_000  # a blank page compresses to a few kB
