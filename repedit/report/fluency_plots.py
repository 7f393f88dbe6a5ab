"""Figures of the style-and-fluency measures (:mod:`repedit.evaluate.measures`); plotly only.

:func:`fluency_figure` shows where each answer sits relative to the :class:`FluencyRule`
thresholds (loops and gibberish outside, strong real styles inside); :func:`marker_figure` shows each
user's pre-registered marker for the unsteered answers, the steered conditions and the real texts.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..evaluate.measures import MARKERS, FluencyRule, marker_movement

_PALETTE = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#1f77b4", "#e377c2", "#17becf", "#bcbd22", "#2ca02c"]


def _colour(name: str, index: int) -> str:
    # Fixed colours for the usual groups so figures from different runs read the same.
    fixed = {"users' real texts": "#2ca02c", "real texts": "#2ca02c", "unsteered": "#7f7f7f"}
    return fixed.get(name, _PALETTE[index % len(_PALETTE)])


def _hover(rows: Sequence[Mapping]) -> list[str]:
    return [str(r.get("text", ""))[:160].replace("<", "&lt;").replace(">", "&gt;") for r in rows]


def fluency_figure(groups: Mapping[str, Sequence[Mapping]], rule: FluencyRule = FluencyRule()) -> go.Figure:
    """Two panels, one point per answer, one colour per group (e.g. "users' real texts", "unsteered",
    "steered ×1", "loop", "gibberish").

    Left: repeated-3-gram rate (x, share) vs ln(perplexity / base) (y), with the loop threshold and the
    perplexity threshold (which the rule applies to each set's *median*). Right: nonword rate (x) vs
    distinct-2 (y) with their thresholds. ``groups[name]`` holds per-answer dicts with the keys of
    :func:`~repedit.evaluate.measures.fluency_measures` and ``log_ppl_ratio`` (as in
    :attr:`FluencyVerdict.per_answer`), optionally ``text`` for the hover.
    """
    figure = make_subplots(rows=1, cols=2, subplot_titles=(
        "loops: repeated 3-grams vs perplexity", "gibberish: nonword rate vs distinct 2-grams"))
    for index, (name, rows) in enumerate(groups.items()):
        colour, hover = _colour(name, index), _hover(rows)
        ys = [r.get("log_ppl_ratio", float("nan")) for r in rows]
        common = dict(mode="markers", name=name, legendgroup=name, text=hover, marker=dict(color=colour, size=8, opacity=0.75))
        figure.add_trace(go.Scatter(x=[r["repeated_3gram"] for r in rows], y=ys, meta={"group": name, "panel": "loops"},
                                    hovertemplate="%{text}<extra>" + name + "</extra>", **common), row=1, col=1)
        figure.add_trace(go.Scatter(x=[r["nonword_rate"] for r in rows], y=[r["distinct_2"] for r in rows], showlegend=False,
                                    meta={"group": name, "panel": "gibberish"}, hovertemplate="%{text}<extra>" + name + "</extra>",
                                    **{k: v for k, v in common.items() if k != "name"}), row=1, col=2)
    line = dict(color="#d62728", dash="dash", width=1)
    figure.add_vline(x=rule.max_repeated_3gram, line=line, row=1, col=1, annotation_text=f"repeated 3-grams {rule.max_repeated_3gram}")
    figure.add_hline(y=math.log(rule.max_perplexity_ratio), line=line, row=1, col=1,
                     annotation_text=f"median ppl ≤ {rule.max_perplexity_ratio}× base")
    figure.add_vline(x=rule.max_nonword_rate, line=line, row=1, col=2, annotation_text=f"nonwords {rule.max_nonword_rate}")
    figure.add_hline(y=rule.min_distinct_2, line=line, row=1, col=2, annotation_text=f"distinct-2 {rule.min_distinct_2}")
    figure.update_xaxes(title_text="repeated 3-gram rate (share)", range=[-0.03, 1.03], row=1, col=1)
    figure.update_yaxes(title_text="ln(perplexity / base)  (base = max(user's texts, unsteered))", row=1, col=1)
    figure.update_xaxes(title_text="nonword rate (share of chunks)", range=[-0.03, 1.03], row=1, col=2)
    figure.update_yaxes(title_text="distinct 2-grams (share)", range=[-0.03, 1.05], row=1, col=2)
    figure.update_layout(title="Fluency rule: degenerate answers fall outside the dashed thresholds, strong styles stay inside",
                         template="plotly_white", height=460, margin=dict(t=80), legend=dict(orientation="h", y=-0.2))
    return figure


def marker_figure(
    values: Mapping[str, Mapping[str, float]], markers: Mapping[str, str], *, real: str = "real texts",
    unsteered: str = "unsteered", normalised: bool = False,
) -> go.Figure:
    """Grouped bars, per user, of that user's chosen marker under each condition.

    ``values[user][condition]`` is the marker mean (conditions e.g. "unsteered", "steered ×1", "real
    texts", in the order given) and ``markers[user]`` the marker's name. Raw values: one panel per user
    (markers have different units). ``normalised=True``: one panel of
    :func:`~repedit.evaluate.measures.marker_movement` (0 = unsteered, 1 = the user's real texts).
    """
    users = list(values)
    conditions = list(dict.fromkeys(c for u in users for c in values[u]))
    if normalised:
        figure = go.Figure()
        for index, condition in enumerate(conditions):
            y = [marker_movement(values[u][unsteered], values[u][condition], values[u][real]) if condition in values[u] else None for u in users]
            figure.add_trace(go.Bar(name=condition, x=[f"{u}<br>({markers[u]})" for u in users], y=y, marker_color=_colour(condition, index)))
        figure.add_hline(y=1, line=dict(color="#2ca02c", dash="dash"), annotation_text="user's real texts")
        figure.update_layout(yaxis_title="movement (0 = unsteered, 1 = real texts)")
    else:
        cols = min(4, max(1, len(users)))
        rows = math.ceil(len(users) / cols)
        figure = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{u}: {markers[u]}" for u in users])
        for k, user in enumerate(users):
            for index, condition in enumerate(conditions):
                figure.add_trace(go.Bar(
                    name=condition, legendgroup=condition, showlegend=k == 0, x=[condition], y=[values[user].get(condition)],
                    marker_color=_colour("users' real texts" if condition == real else condition, index),
                    hovertemplate=f"{user} · {markers[user]} ({MARKERS.get(markers[user], '')})<br>%{{x}}: %{{y:.3f}}<extra></extra>",
                ), row=k // cols + 1, col=k % cols + 1)
        figure.update_xaxes(showticklabels=False)
    figure.update_layout(title="Each user's pre-registered style marker: unsteered → steered → the user's real texts",
                         barmode="group", template="plotly_white", height=360 if normalised else 260 * math.ceil(len(users) / 4) + 120,
                         margin=dict(t=80), legend=dict(orientation="h", y=-0.15))
    return figure
