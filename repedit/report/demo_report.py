"""The main job's one-page HTML report (``runs/demo/report.html``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..capture.activations import Activations
from ..evaluate.evaluation import Evaluation
from ..evaluate.select import Selection
from ..probes.types import ProbeReport
from .eval_report import eval_sections
from .htmlpage import Figures, esc, num_cell, write_page
from .probe_plots import accuracy_by_layer, pairs_by_user, pairs_scatter


def write_demo_report(out_dir: Path, report: ProbeReport, acts: Activations, evaluation: Evaluation, selection: Selection,
                  exports: dict[str, Any], times: dict[str, float]) -> Path:
    """Write ``out_dir/report.html``: probes, latent space, choices, evaluation, exports, stage times."""
    figure = Figures()
    best = report.selected[0]["site"] if report.selected else acts.sites[len(acts.sites) // 2]
    choices = "".join(
        f"<tr><td>{esc(u)}</td><td>{esc(c['layer'] if c['layer'] is not None else '— (unsteered)')}</td>"
        f"{num_cell(c['strength'], 2)}{num_cell(c['gain'])}{num_cell(c['kl'])}</tr>"
        for u, c in selection.choices.items()
    )
    timing = "".join(f"<tr><td>{esc(stage)}</td>{num_cell(seconds, 1)}</tr>" for stage, seconds in times.items())
    gguf = "".join(f"<tr><td>{esc(u)}</td><td><code>{esc(g['path'])}</code></td><td><code>{esc(g['llama_cpp'])}</code></td></tr>" for u, g in exports["gguf"].items())
    sections = [
        "<p>The whole repedit pipeline on the built-in demo users and the embedded default model: self-generated pairs → "
        "probes → one edit per user (trained jointly by default) with its strength chosen on validation items → held-out evaluation → exports. "
        "Every number below was measured by this run.</p>",
        "<h2>Where is personalisation represented?</h2>"
        "<p>Held-out accuracy of probes separating each user's personalised answers from neutral ones, per layer "
        "(control = same probe on labels shuffled within pairs; selectivity = accuracy − control).</p>"
        + figure(accuracy_by_layer(report), "probe-accuracy"),
        f"<h2>The latent space of the pairs ({esc(best)})</h2>"
        "<p>2-D PCA of every pair's two answers (mean over response tokens); colour = user, circle = personalised, x = neutral; "
        "a grey line joins the two answers of a pair.</p>" + figure(pairs_scatter(acts, best, color_by="user"), "pairs-scatter")
        + "<p>The same pairs per user, each panel with its own PCA: red circles personalised, blue crosses neutral.</p>"
        + figure(pairs_by_user(acts, best), "pairs-by-user"),
        f"<h2>Selected layer and strength per user</h2><p>Rule: {esc(selection.rule)}.</p><table><tr><th>user</th><th>layer</th><th>strength</th>"
        f"<th>validation gain (nats/token)</th><th>KL</th></tr>{choices}</table>",
        *eval_sections(evaluation, figure, grid=selection.grid),
        f"<h2>Exports</h2><p>Per-user store: <code>{esc(exports['store'])}/</code> ({len(exports['store_users'])} users). "
        "llama.cpp control vectors:</p><table><tr><th>user</th><th>file</th><th>llama.cpp flag</th></tr>" + gguf + "</table>",
        "<h2>Stage times (seconds, first run of each stage)</h2><table>" + timing + "</table>"
        '<p class="note">Detailed reports: <code>probes/report.html</code>, <code>eval/eval.html</code>; numbers in '
        "<code>probes/report.json</code>, <code>eval/eval.json</code>, <code>store/selection.json</code>.</p>",
    ]
    return write_page(out_dir / "report.html", "repedit demo: per-user personalisation by steering", sections)
