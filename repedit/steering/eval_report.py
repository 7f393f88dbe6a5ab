"""Figures and the HTML report of an :class:`~repedit.steering.evaluation.Evaluation`.

:func:`write_eval_report` writes ``eval.json`` (every number) and ``eval.html`` (opens offline):
summary, held-out metrics per user (table and bars), effect vs strength per user on held-out data,
the selection sweep (validation gain and KL per layer and strength, when given) and sample answers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..htmlpage import Figures, esc, num_cell, write_page
from .evaluation import CONDITIONS, Evaluation

_COLOURS = {"unsteered": "#7f7f7f", "prompt_only": "#1f77b4", "steered": "#d62728", "reference": "#2ca02c"}
_LABELS = {"unsteered": "unsteered", "prompt_only": "prompt-only (insights in prompt)", "steered": "steered", "reference": "user's real text"}


def metric_bars(evaluation: Evaluation, metric: str, title: str, conditions: Sequence[str] = CONDITIONS) -> go.Figure:
    """Grouped bars: ``metric`` per user (x) for each condition."""
    users = list(evaluation.per_user)
    figure = go.Figure()
    for condition in conditions:
        figure.add_trace(go.Bar(
            name=_LABELS[condition], x=users, marker_color=_COLOURS[condition],
            y=[evaluation.per_user[u][condition].get(metric) for u in users],
        ))
    figure.update_layout(barmode="group", title=title, height=380, margin=dict(t=50, b=40), legend=dict(orientation="h", y=-0.2))
    return figure


def gain_bars(evaluation: Evaluation) -> go.Figure:
    """Held-out log-likelihood gain over unsteered (nats/token) per user, prompt-only and steered side by side."""
    users = list(evaluation.per_user)
    figure = go.Figure()
    for condition in ("prompt_only", "steered"):
        figure.add_trace(go.Bar(
            name=_LABELS[condition], x=users, marker_color=_COLOURS[condition],
            y=[evaluation.per_user[u][condition]["loglik"] - evaluation.per_user[u]["unsteered"]["loglik"] for u in users],
        ))
    figure.add_hline(y=0, line=dict(color="#555", width=1))
    figure.update_layout(
        barmode="group", height=400, margin=dict(t=60, b=40), legend=dict(orientation="h", y=-0.18),
        title="Held-out log-likelihood gain over the unsteered model (nats/token; > 0 = the user's own texts became more likely)",
        yaxis_title="gain (nats/token)",
    )
    return figure


def strength_curves(evaluation: Evaluation) -> go.Figure:
    """Held-out log-likelihood gain (left) and KL on neutral text (right) vs strength factor, one line per user."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("held-out log-likelihood gain (nats/token)", "KL to unsteered on neutral text (nats/token)"))
    users = list(dict.fromkeys(row["user_id"] for row in evaluation.strength_curve))
    for index, user in enumerate(users):
        rows = sorted((r for r in evaluation.strength_curve if r["user_id"] == user), key=lambda r: r["factor"])
        colour = f"hsl({int(360 * index / max(len(users), 1))},65%,45%)"
        x = [r["factor"] for r in rows]
        figure.add_trace(go.Scatter(x=x, y=[r["gain"] for r in rows], name=user, legendgroup=user, line=dict(color=colour)), row=1, col=1)
        figure.add_trace(go.Scatter(x=x, y=[r["kl"] for r in rows], name=user, legendgroup=user, showlegend=False, line=dict(color=colour)), row=1, col=2)
    figure.add_hline(y=0, line=dict(color="#999", dash="dot"), row=1, col=1)
    figure.add_hline(y=evaluation.max_kl, line=dict(color="#d62728", dash="dash"), row=1, col=2, annotation_text="KL limit")
    figure.update_xaxes(title_text="strength factor (1 = selected edit)")
    figure.update_layout(title="Effect vs strength, per user (held-out data)", height=420, margin=dict(t=70))
    return figure


def selection_sweep(grid: Sequence[dict[str, Any]], max_kl: float) -> go.Figure:
    """Validation gain vs KL for every (user, layer, strength) of the selection sweep; one colour per user."""
    figure = go.Figure()
    users = list(dict.fromkeys(row["user_id"] for row in grid))
    for index, user in enumerate(users):
        rows = [r for r in grid if r["user_id"] == user]
        figure.add_trace(go.Scatter(
            x=[r["kl"] for r in rows], y=[r["gain"] for r in rows], mode="markers", name=user,
            marker=dict(color=f"hsl({int(360 * index / max(len(users), 1))},65%,45%)", size=8),
            text=[f"layer {r['layer']}, strength {r['strength']}" for r in rows],
            hovertemplate="%{text}<br>KL %{x:.3f}<br>gain %{y:+.3f}<extra>" + esc(user) + "</extra>",
        ))
    figure.add_vline(x=max_kl, line=dict(color="#d62728", dash="dash"), annotation_text="KL limit")
    figure.update_xaxes(type="log", title_text="KL to unsteered on neutral text (nats/token, log scale)")
    figure.update_yaxes(title_text="validation log-likelihood gain (nats/token)")
    figure.update_layout(title="Selection sweep: every layer × strength per user", height=440)
    return figure


def _metrics_table(evaluation: Evaluation) -> str:
    head = (
        "<tr><th rowspan=2>user</th><th colspan=3>held-out log-likelihood (nats/token, ↑)</th>"
        "<th colspan=4>style margin (↑)</th><th colspan=3>perplexity of answers (↓)</th><th rowspan=2>KL steered</th></tr>"
        "<tr><th>unsteered</th><th>prompt-only</th><th>steered</th><th>unsteered</th><th>prompt-only</th><th>steered</th>"
        "<th>real text</th><th>unsteered</th><th>prompt-only</th><th>steered</th></tr>"
    )

    def cell(user: str, condition: str, metric: str, higher_is_better: bool) -> str:
        value = evaluation.per_user[user][condition].get(metric)
        base = evaluation.per_user[user]["unsteered"].get(metric)
        css = ""
        if condition != "unsteered" and isinstance(value, float) and isinstance(base, float) and not (math.isnan(value) or math.isnan(base)) and value != base:
            css = "better" if (value > base) == higher_is_better else "worse"
        return num_cell(value, 3, css)

    body = ""
    for user, metrics in evaluation.per_user.items():
        note = "" if metrics["steered"].get("has_edit") else " <span class=note>(no edit: left unsteered)</span>"
        body += (
            f"<tr><td>{esc(user)}{note}</td>"
            + "".join(cell(user, c, "loglik", True) for c in CONDITIONS)
            + "".join(cell(user, c, "style_margin", True) for c in CONDITIONS) + num_cell(metrics["reference"]["style_margin"])
            + "".join(cell(user, c, "perplexity", False) for c in CONDITIONS) + num_cell(metrics["steered"]["kl"])
            + "</tr>"
        )
    return f"<table>{head}{body}</table>"


def _summary(evaluation: Evaluation) -> str:
    s = evaluation.summary
    steered, prompt_only = s["steered"], s["prompt_only"]
    return (
        f"<p>{s['n_users']} users, {evaluation.settings.get('n_test_items', '?')} held-out items. "
        f"<b>Steered</b> beats unsteered on held-out log-likelihood for <b>{steered['users_loglik_better']}/{s['n_users']}</b> users "
        f"(mean gain {steered['loglik_gain']:+.3f} nats/token; {steered['users_with_edit']} users have an edit; "
        f"{steered['users_within_kl']}/{s['n_users']} within the KL limit of {s['max_kl']} nats/token, mean KL {steered['kl']:.3f}). "
        f"<b>Prompt-only</b>: {prompt_only['users_loglik_better']}/{s['n_users']} users, mean gain {prompt_only['loglik_gain']:+.3f}. "
        f"Style margin better than unsteered: steered {steered['users_style_margin_better']}/{s['n_users']}, "
        f"prompt-only {prompt_only['users_style_margin_better']}/{s['n_users']}. "
        f"Mean perplexity of answers: unsteered {s['unsteered']['perplexity']:.2f}, prompt-only {prompt_only['perplexity']:.2f}, "
        f"steered {steered['perplexity']:.2f}.</p>"
        f'<p class="note">Style embedder: {esc(evaluation.embedder)}. Style margin = cosine to the user\'s history centroid minus the mean '
        "cosine to the other users' centroids.</p>"
    )


def _samples(evaluation: Evaluation, per_user: int = 1) -> str:
    shown: dict[str, int] = {}
    blocks = []
    for sample in evaluation.samples:
        if shown.get(sample["user_id"], 0) >= per_user:
            continue
        shown[sample["user_id"]] = shown.get(sample["user_id"], 0) + 1
        cells = "".join(f"<div><b>{esc(_LABELS[c])}</b><p>{esc(sample[c])}</p></div>" for c in ("reference", *CONDITIONS))
        blocks.append(f"<h3>{esc(sample['user_id'])}: <i>{esc(sample['prompt'])}</i></h3><div class=pair>{cells}</div>")
    return "".join(blocks)


def eval_sections(evaluation: Evaluation, figure: Figures, *, grid: Sequence[dict[str, Any]] | None = None) -> list[str]:
    """The report's HTML sections (summary, metrics, effect vs strength, selection sweep, samples)."""
    sections = [
        "<h2>Summary</h2>" + _summary(evaluation),
        "<h2>Held-out metrics per user</h2>" + _metrics_table(evaluation),
        figure(gain_bars(evaluation), "eval-loglik-gain"),
        figure(metric_bars(evaluation, "style_margin", "Style margin of generated answers", (*CONDITIONS, "reference")), "eval-style"),
        figure(metric_bars(evaluation, "perplexity", "Perplexity of generated answers under the unsteered model"), "eval-perplexity"),
    ]
    if evaluation.strength_curve:
        sections.append("<h2>Effect vs strength</h2>" + figure(strength_curves(evaluation), "eval-strength"))
    if grid:
        sections.append("<h2>Layer and strength selection</h2>" + figure(selection_sweep(grid, evaluation.max_kl), "eval-selection"))
    sections.append("<h2>Sample answers</h2>" + _samples(evaluation))
    return sections


def write_eval_report(evaluation: Evaluation, out_dir: str | Path, *, grid: Sequence[dict[str, Any]] | None = None, title: str = "repedit: held-out evaluation") -> Path:
    """Write ``eval.json`` and ``eval.html`` into ``out_dir``; returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluation.save(out_dir / "eval.json")
    return write_page(out_dir / "eval.html", title, eval_sections(evaluation, Figures(), grid=grid))
