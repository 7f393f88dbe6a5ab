"""Figures and the HTML report of an :class:`~repedit.evaluate.evaluation.Evaluation`.

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

from ..evaluate.evaluation import CONDITIONS, Evaluation
from .fluency_plots import fluency_figure
from .htmlpage import Figures, esc, num_cell, write_page

_COLOURS = {"unsteered": "#7f7f7f", "prompt_only": "#1f77b4", "few_shot": "#9467bd", "steered": "#d62728", "prompt_steered": "#ff7f0e",
            "reference": "#2ca02c"}
_LABELS = {"unsteered": "unsteered", "prompt_only": "prompt-only (insights in prompt)", "few_shot": "few-shot (user's own items in prompt)",
           "steered": "steered", "prompt_steered": "prompt + steered", "reference": "user's real text"}


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
    for condition in CONDITIONS[1:]:
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


def conditions_table(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One row per condition: the numbers that say which personalisation wins, and at what cost."""
    s = evaluation.summary
    n = s["n_users"]
    rows = []
    for condition in CONDITIONS:
        c = s[condition]
        rows.append({
            "condition": condition, "loglik": c["loglik"], "nll_reduction": c.get("nll_reduction", 0.0),
            "users_loglik_better": c.get("users_loglik_better"), "users_above_prompt_only": c.get("users_loglik_above_prompt_only"),
            "attribution": s.get("attribution", {}).get(condition), "users_marker_moved_30": c.get("users_marker_moved_30"),
            "style_margin": c["style_margin"], "perplexity": c["perplexity"], "repeated_3gram_max": c["repeated_3gram_max"],
            "users_fluent": c.get("users_fluent"), "kl": c.get("kl"), "context_tokens": c["context_tokens"],
            "latency_s": s.get("latency_s", {}).get(condition), "n_users": n,
        })
    return rows


def format_conditions_table(evaluation: Evaluation) -> str:
    """The conditions table as plain text (what ``repedit eval`` and ``repedit demo`` print)."""
    s = evaluation.summary
    n = s["n_users"]
    head = (f"{'condition':<15}{'loglik':>8}{'NLL -%':>8}{'>unst':>6}{'>prompt':>8}{'attrib':>8}{'marker30':>9}{'rep3max':>8}"
            f"{'fluent':>7}{'KL':>7}{'ctx tok':>8}{'s/req':>7}")
    lines = [head]
    for r in conditions_table(evaluation):
        def count(x):
            return f"{x}/{n}" if x is not None else "-"
        lines.append(
            f"{r['condition']:<15}{r['loglik']:>8.3f}{100 * r['nll_reduction']:>7.1f}%{count(r['users_loglik_better']):>6}"
            f"{count(r['users_above_prompt_only']):>8}{(r['attribution'] or 0):>8.2f}{count(r['users_marker_moved_30']):>9}"
            f"{r['repeated_3gram_max']:>8.2f}{count(r['users_fluent']):>7}{(r['kl'] if r['kl'] is not None else float('nan')):>7.3f}"
            f"{r['context_tokens']:>8.0f}{(r['latency_s'] or float('nan')):>7.2f}")
    a = s.get("attribution", {})
    if a:
        lines.append(f"attribution: chance {a['chance']:.2f}, shuffled-label control {a['shuffled_labels']:.2f}, users' real held-out texts {a['reference']:.2f}")
    return "\n".join(lines)


def _metrics_table(evaluation: Evaluation) -> str:
    metrics = [("loglik", "held-out log-likelihood (nats/token, ↑)", True), ("attribution", "attributed to the user (share, ↑)", True),
               ("marker_movement", "marker moved toward the user (↑, 1 = reached)", True), ("perplexity", "perplexity of answers (↓)", False)]
    head = "<tr><th rowspan=2>user</th><th rowspan=2>marker</th>" + "".join(f"<th colspan={len(CONDITIONS)}>{esc(t)}</th>" for _, t, _ in metrics) + "<th rowspan=2>KL steered</th></tr>"
    head += "<tr>" + "".join(f"<th>{esc(c.replace('_', ' '))}</th>" for _ in metrics for c in CONDITIONS) + "</tr>"

    def cell(user: str, condition: str, metric: str, higher_is_better: bool) -> str:
        value = evaluation.per_user[user][condition].get(metric)
        base = evaluation.per_user[user]["unsteered"].get(metric)
        css = ""
        if condition != "unsteered" and isinstance(value, float) and isinstance(base, float) and not (math.isnan(value) or math.isnan(base)) and value != base:
            css = "better" if (value > base) == higher_is_better else "worse"
        return num_cell(value, 3, css)

    body = ""
    for user, m in evaluation.per_user.items():
        note = "" if m["steered"].get("has_edit") else " <span class=note>(no edit: left unsteered)</span>"
        body += (f"<tr><td>{esc(user)}{note}</td><td>{esc(m['reference'].get('marker', ''))}</td>"
                 + "".join(cell(user, c, metric, hib) for metric, _, hib in metrics for c in CONDITIONS)
                 + num_cell(m["steered"].get("kl")) + "</tr>")
    return f"<table>{head}{body}</table>"


def _summary(evaluation: Evaluation) -> str:
    rows = conditions_table(evaluation)
    n = evaluation.summary["n_users"]
    head = ("<tr><th>condition</th><th>held-out loglik</th><th>NLL reduction</th><th>users better than unsteered</th>"
            "<th>users above prompt-only</th><th>attribution accuracy</th><th>users whose marker moved ≥ 30%</th>"
            "<th>max repeated-3-gram rate</th><th>fluent users</th><th>KL (neutral)</th><th>context tokens / request</th><th>s / request</th></tr>")
    body = "".join(
        f"<tr><td>{esc(_LABELS[r['condition']])}</td>{num_cell(r['loglik'])}{num_cell(100 * r['nll_reduction'], 1)}"
        f"<td>{r['users_loglik_better'] if r['users_loglik_better'] is not None else '–'}/{n}</td>"
        f"<td>{r['users_above_prompt_only'] if r['users_above_prompt_only'] is not None else '–'}/{n}</td>{num_cell(r['attribution'])}"
        f"<td>{r['users_marker_moved_30'] if r['users_marker_moved_30'] is not None else '–'}/{n}</td>{num_cell(r['repeated_3gram_max'])}"
        f"<td>{r['users_fluent'] if r['users_fluent'] is not None else '–'}/{n}</td>{num_cell(r['kl'])}{num_cell(r['context_tokens'], 0)}{num_cell(r['latency_s'], 2)}</tr>"
        for r in rows)
    a = evaluation.summary.get("attribution", {})
    note = (f"<p>Attribution: a character n-gram classifier trained on the users' real training texts names the author of each answer; "
            f"chance {a.get('chance', float('nan')):.2f}, the same classifier trained on shuffled labels {a.get('shuffled_labels', float('nan')):.2f}, "
            f"on the users' real held-out texts {a.get('reference', float('nan')):.2f} (the ceiling).</p>") if a else ""
    return (f"<p>{n} users, {evaluation.settings.get('n_test_items', '?')} held-out items never seen by pairs, fitting or selection.</p>"
            f"<table>{head}{body}</table>{note}"
            f'<p class="note">Style embedder: {esc(evaluation.embedder)}. Markers: each user\'s lexical marker was chosen from their training texts '
            "and the unsteered answers before any edited answer was generated; moved = (condition − unsteered) / (user's texts − unsteered).</p>")


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
        figure(metric_bars(evaluation, "attribution", "Share of answers the style classifier attributes to the user", (*CONDITIONS, "reference")), "eval-attribution"),
        figure(metric_bars(evaluation, "marker_movement", "How far each user's style marker moved toward their real texts (1 = all the way)"), "eval-marker"),
        figure(metric_bars(evaluation, "style_margin", "Style margin of generated answers", (*CONDITIONS, "reference")), "eval-style"),
        figure(metric_bars(evaluation, "perplexity", "Perplexity of generated answers under the unsteered model"), "eval-perplexity"),
    ]
    if evaluation.fluency_points:
        groups: dict[str, list[dict[str, Any]]] = {}
        for point in evaluation.fluency_points:
            groups.setdefault(_LABELS.get(point["group"], point["group"]), []).append(point)
        controls = evaluation.summary.get("fluency_controls", {})
        admitted = ", ".join(f"{_LABELS.get(g, g)} {k}/{controls.get('n_users', '?')}" for g, k in controls.get("admitted_users", {}).items())
        sections.append("<h2>Fluency rule: loops and gibberish out, strong styles in</h2>"
                        f"<p>Users whose answers the rule admits, per group: {esc(admitted)}. The constructed loops and gibberish are "
                        "controls made from the unsteered answers; the rule must reject them.</p>" + figure(fluency_figure(groups), "eval-fluency"))
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
