"""Plotly figures of probing results (each function returns a ``plotly.graph_objects.Figure``).

* :func:`accuracy_by_layer` — held-out accuracy, control accuracy and selectivity by layer, per method;
* :func:`pairs_scatter` — 2-D PCA of the pairs at one site, coloured by label or by user;
* :func:`pairs_by_user` — one 2-D PCA panel per user (personalised vs neutral);
* :func:`direction_similarity_across_layers` / :func:`direction_similarity_across_users` — cosine
  similarity heatmaps between probes.

Figures use SVG traces (``go.Scatter``), not WebGL, so that they also render in headless browsers
and in environments without GPU-backed WebGL (e.g. static screenshots of the HTML report).
"""

from __future__ import annotations

from typing import Any, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..capture.activations import Activations
from ..model.sites import SITE_KINDS
from ..probes.types import POOLED, Direction, Probe, ProbeReport, ProbeRow, Subspace
from .plots import _PALETTE, pca_2d

_LABEL_NAMES = {1: "personalised", 0: "neutral"}
_SYMBOLS = ("circle", "x", "diamond", "square", "triangle-up", "star", "cross", "triangle-down", "pentagon", "hexagon")


def user_key(user_id: str | None) -> str:
    """The user of a probe or selection entry as in :class:`ProbeRow`: ``None`` (pooled) becomes ``POOLED``."""
    return POOLED if user_id is None else str(user_id)


def site_order(site: str) -> tuple[int, int, str]:
    """Sort key for site names: by layer, then residual-stream order of the kind (``resid_pre`` first)."""
    kind, _, layer = site.rpartition(".")
    try:
        layer_index = int(layer)
    except ValueError:
        return (1 << 30, 0, site)
    kind_index = SITE_KINDS.index(kind) if kind in SITE_KINDS else len(SITE_KINDS)
    return (layer_index, kind_index, site)


def _kind(site: str) -> str:
    return site.rpartition(".")[0] or site


def _methods(rows: Sequence[ProbeRow]) -> list[str]:
    return list(dict.fromkeys(row.method for row in rows))


def accuracy_by_layer(report: ProbeReport, user_id: str = POOLED, *, title: str | None = None) -> go.Figure:
    """Accuracy and selectivity by layer, one line per method, for one user (``POOLED`` = all users).

    Top panel: held-out accuracy (solid, with ±1 std error bars over folds) and control accuracy
    (dotted, same colour: the same probe trained on labels shuffled within pairs), with a dashed
    chance line at 0.5; the sites :attr:`ProbeReport.selected` for this user are marked with stars.
    Bottom panel: selectivity = accuracy − control accuracy. When several site kinds were probed
    (e.g. ``resid_post`` and ``mlp_out``), each (method, kind) gets its own line, named
    ``"method · kind"``.

    Every trace's ``meta`` is a dict with ``"series"`` (``"accuracy"``, ``"control"``,
    ``"selectivity"``, ``"selected"`` or ``"chance"``) and ``"method"``, for programmatic access.
    """
    rows = [row for row in report.rows if row.user_id == user_id]
    if not rows:
        users = sorted({row.user_id for row in report.rows})
        raise ValueError(f"no probe rows for user {user_id!r}; users in the report: {', '.join(users) or '(none)'}")
    kinds = list(dict.fromkeys(_kind(row.site) for row in sorted(rows, key=lambda r: site_order(r.site))))
    figure = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.6, 0.4],
        subplot_titles=("held-out accuracy (dotted: control, shuffled labels)", "selectivity = accuracy − control"),
    )
    for method_index, method in enumerate(_methods(rows)):
        colour = _PALETTE[method_index % len(_PALETTE)]
        for kind_index, kind in enumerate(kinds):
            series = sorted((r for r in rows if r.method == method and _kind(r.site) == kind), key=lambda r: r.layer)
            if not series:
                continue
            name = method if len(kinds) == 1 else f"{method} · {kind}"
            layers = [r.layer for r in series]
            hover = [
                f"{r.site}<br>{r.method}<br>accuracy {r.accuracy:.3f} ± {r.accuracy_std:.3f}<br>control {r.control_accuracy:.3f}"
                f"<br>selectivity {r.selectivity:.3f}<br>margin {r.margin:.2f}<br>{r.n_pairs} pairs, {r.folds} folds"
                for r in series
            ]
            dash = ("solid", "dash", "dashdot", "longdash")[kind_index % 4]
            figure.add_trace(go.Scatter(
                x=layers, y=[r.accuracy for r in series], name=name, legendgroup=name, mode="lines+markers",
                line={"color": colour, "dash": dash}, error_y={"type": "data", "array": [r.accuracy_std for r in series], "visible": True},
                text=hover, hovertemplate="%{text}<extra></extra>", meta={"series": "accuracy", "method": method, "kind": kind},
            ), row=1, col=1)
            figure.add_trace(go.Scatter(
                x=layers, y=[r.control_accuracy for r in series], name=f"{name} (control)", legendgroup=name, showlegend=False,
                mode="lines", line={"color": colour, "dash": "dot", "width": 1.5}, opacity=0.7,
                hovertemplate="control %{y:.3f}<extra>" + name + "</extra>", meta={"series": "control", "method": method, "kind": kind},
            ), row=1, col=1)
            figure.add_trace(go.Scatter(
                x=layers, y=[r.selectivity for r in series], name=f"{name} (selectivity)", legendgroup=name, showlegend=False,
                mode="lines+markers", line={"color": colour, "dash": dash},
                hovertemplate="selectivity %{y:.3f}<extra>" + name + "</extra>", meta={"series": "selectivity", "method": method, "kind": kind},
            ), row=2, col=1)
    selected = _selected_rows(report, rows, user_id)
    if selected:
        figure.add_trace(go.Scatter(
            x=[r.layer for r in selected], y=[r.accuracy for r in selected], mode="markers", name="selected",
            marker={"symbol": "star", "size": 16, "color": "gold", "line": {"color": "black", "width": 1}},
            text=[f"#{rank + 1}: {r.site} · {r.method}" for rank, r in enumerate(selected)],
            hovertemplate="selected %{text}<extra></extra>", meta={"series": "selected", "method": None},
        ), row=1, col=1)
    layers = sorted({row.layer for row in rows})
    figure.add_trace(go.Scatter(
        x=[layers[0] - 0.5, layers[-1] + 0.5], y=[0.5, 0.5], mode="lines", name="chance", line={"color": "grey", "dash": "dash", "width": 1},
        hoverinfo="skip", meta={"series": "chance", "method": None},
    ), row=1, col=1)
    figure.add_hline(y=0.0, line={"color": "grey", "dash": "dash", "width": 1}, row=2, col=1)
    who = "all users (pooled)" if user_id == POOLED else f"user {user_id}"
    figure.update_layout(
        title=title or f"Probe accuracy by layer — {who}", template="plotly_white", height=560,
        legend={"orientation": "h", "y": -0.12},
    )
    figure.update_yaxes(title_text="accuracy", range=[0.0, 1.05], row=1, col=1)
    figure.update_yaxes(title_text="selectivity", row=2, col=1)
    figure.update_xaxes(title_text="layer", dtick=1, row=2, col=1)
    return figure


def _selected_rows(report: ProbeReport, rows: Sequence[ProbeRow], user_id: str) -> list[ProbeRow]:
    """The evaluation rows of the report's selected sites for ``user_id``, in selection order."""
    by_key = {(r.site, r.method): r for r in rows}
    out = []
    for entry in report.selected:
        if user_key(entry.get("user_id")) != user_id:
            continue
        row = by_key.get((entry.get("site"), entry.get("method")))
        if row is not None:
            out.append(row)
    return out


def _hover(meta: dict[str, Any], index: int, max_chars: int = 160) -> str:
    """Hover text of one item from its metadata (label, user, pair, prompt, and any text field)."""
    label = meta.get("label")
    parts = [
        f"item {index}: <b>{_LABEL_NAMES.get(int(label), str(label)) if label is not None else '?'}</b>",
        f"user {meta.get('user_id', '?')} · pair {meta.get('pair_id', '?')}",
    ]
    for field in ("prompt", "response", "text"):
        value = meta.get(field)
        if isinstance(value, str) and value:
            short = value if len(value) <= max_chars else value[: max_chars - 1] + "…"
            parts.append(f"{field}: {_escape(short)}")
    return "<br>".join(parts)


def _escape(text: str) -> str:
    # Plotly hover text is HTML-like; escape angle brackets so chat-template tokens stay visible.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def pairs_scatter(
    acts: Activations,
    site: str,
    color_by: str = "label",
    *,
    connect_pairs: bool = True,
    max_users: int = len(_PALETTE),
    title: str | None = None,
) -> go.Figure:
    """2-D PCA scatter of the pairs' activations at one site.

    Args:
        acts: activations with one row per item and the pair metadata of
            :func:`repedit.probes.capture_pairs` (``label``, ``pair_id``, ``user_id``, ``prompt``).
        site: the site to show.
        color_by: ``"label"`` — colour = personalised/neutral, marker symbol = user; or ``"user"`` —
            colour = user, symbol = label (circle personalised, x neutral).
        connect_pairs: draw a thin grey line between the two members of each pair (same ``pair_id``),
            which makes a shared personalisation offset visible as parallel segments.
        max_users: users beyond this many (in order of first appearance) share the last colour/symbol
            group ``"other users"``, so that the legend stays readable.

    One trace per colour group holds its points (``meta={"series": "points", "group": ...}``); legend-only
    traces explain the symbols (``meta={"series": "symbol-legend"}``) and one trace holds the pair lines
    (``meta={"series": "pairs"}``). Hover text comes from the item metadata.
    """
    if color_by not in ("label", "user"):
        raise ValueError(f"color_by must be 'label' or 'user', got {color_by!r}")
    if acts.position == "all":
        raise ValueError("pairs_scatter needs one row per item: capture with position='mean' or 'last'")
    if len(acts.metadata) != acts.n_items:
        raise ValueError(f"activations have {len(acts.metadata)} metadata entries for {acts.n_items} items")
    coords, ratio = pca_2d(acts[site])
    metadata = acts.metadata
    labels = [_LABEL_NAMES.get(int(m["label"]), str(m["label"])) if "label" in m else "unlabelled" for m in metadata]
    users_all = [str(m.get("user_id", "default")) for m in metadata]
    distinct_users = list(dict.fromkeys(users_all))
    if len(distinct_users) > max_users:
        kept = set(distinct_users[: max_users - 1])
        users = [u if u in kept else "other users" for u in users_all]
    else:
        users = users_all
    label_groups = [name for name in ("personalised", "neutral") if name in labels] + sorted(set(labels) - {"personalised", "neutral"})
    user_groups = list(dict.fromkeys(users))
    colour_of, symbol_of = (labels, users) if color_by == "label" else (users, labels)
    colour_groups, symbol_groups = (label_groups, user_groups) if color_by == "label" else (user_groups, label_groups)
    symbol_index = {name: i for i, name in enumerate(symbol_groups)}
    hover = [_hover(m, i) for i, m in enumerate(metadata)]
    figure = go.Figure()
    if connect_pairs and all("pair_id" in m for m in metadata):
        members: dict[Any, list[int]] = {}
        for index, meta in enumerate(metadata):
            members.setdefault(meta["pair_id"], []).append(index)
        xs: list[float | None] = []
        ys: list[float | None] = []
        for rows in members.values():
            if len(rows) == 2:
                xs += [float(coords[rows[0], 0]), float(coords[rows[1], 0]), None]
                ys += [float(coords[rows[0], 1]), float(coords[rows[1], 1]), None]
        if xs:
            figure.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines", name="pairs", line={"color": "rgba(120,120,120,0.35)", "width": 1},
                hoverinfo="skip", meta={"series": "pairs"},
            ))
    for group_index, group in enumerate(colour_groups):
        rows = [i for i, value in enumerate(colour_of) if value == group]
        colour = _label_colour(group) if color_by == "label" else _PALETTE[group_index % len(_PALETTE)]
        figure.add_trace(go.Scatter(
            x=coords[rows, 0].tolist(), y=coords[rows, 1].tolist(), mode="markers", name=group, legendgroup=group,
            marker={
                "color": colour, "size": 9, "opacity": 0.85, "line": {"width": 0.5, "color": "white"},
                "symbol": [_SYMBOLS[symbol_index[symbol_of[i]] % len(_SYMBOLS)] for i in rows],
            },
            text=[hover[i] for i in rows], hovertemplate="%{text}<extra></extra>", meta={"series": "points", "group": group},
        ))
    if len(symbol_groups) > 1:
        # Legend-only traces (no data) that say which marker symbol stands for which user/label.
        for name in symbol_groups:
            figure.add_trace(go.Scatter(
                x=[None], y=[None], mode="markers", name=f"{'user' if color_by == 'label' else ''} {name}".strip(),
                marker={"symbol": _SYMBOLS[symbol_index[name] % len(_SYMBOLS)], "color": "grey", "size": 9},
                meta={"series": "symbol-legend", "group": name},
            ))
    pc1, pc2 = (100 * ratio).tolist()
    figure.update_layout(
        title=title or f"Pairs at {site}: 2-D PCA, coloured by {color_by}", template="plotly_white", height=520,
        xaxis_title=f"PC1 ({pc1:.0f}% var)", yaxis_title=f"PC2 ({pc2:.0f}% var)",
    )
    return figure


def pairs_by_user(acts: Activations, site: str, *, columns: int = 4, max_users: int = 12, title: str | None = None) -> go.Figure:
    """One small 2-D PCA panel per user: that user's pairs at ``site``, PCA fitted on the user's own rows.

    Personalised answers are red circles, neutral ones blue crosses, and a grey line joins the two
    answers of a pair; a user whose personalisation is one consistent direction shows parallel lines
    and two separated clouds. Panels are titled with the user id and the share of variance of PC1.
    """
    if acts.position == "all":
        raise ValueError("pairs_by_user needs one row per item: capture with position='mean' or 'last'")
    users = list(dict.fromkeys(str(m.get("user_id", "default")) for m in acts.metadata))[:max_users]
    rows_n = (len(users) + columns - 1) // columns
    titles = []
    panels = []
    for user in users:
        rows = [i for i, m in enumerate(acts.metadata) if str(m.get("user_id", "default")) == user]
        coords, ratio = pca_2d(acts[site][rows]) if len(rows) >= 3 else (torch.zeros(len(rows), 2, dtype=torch.float64), torch.zeros(2))
        panels.append((rows, coords))
        titles.append(f"{user} (PC1 {100 * float(ratio[0]):.0f}%)")
    figure = make_subplots(rows=max(rows_n, 1), cols=columns, subplot_titles=titles, horizontal_spacing=0.04, vertical_spacing=0.12)
    for index, (rows, coords) in enumerate(panels):
        r, c = index // columns + 1, index % columns + 1
        members: dict[Any, list[int]] = {}
        for local, i in enumerate(rows):
            members.setdefault(acts.metadata[i].get("pair_id"), []).append(local)
        xs: list[float | None] = []
        ys: list[float | None] = []
        for pair in members.values():
            if len(pair) == 2:
                xs += [float(coords[pair[0], 0]), float(coords[pair[1], 0]), None]
                ys += [float(coords[pair[0], 1]), float(coords[pair[1], 1]), None]
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "rgba(120,120,120,0.35)", "width": 1},
                                    hoverinfo="skip", showlegend=False), row=r, col=c)
        for label, name in ((1, "personalised"), (0, "neutral")):
            picked = [local for local, i in enumerate(rows) if int(acts.metadata[i].get("label", -1)) == label]
            figure.add_trace(go.Scatter(
                x=coords[picked, 0].tolist(), y=coords[picked, 1].tolist(), mode="markers", name=name, legendgroup=name,
                showlegend=index == 0, marker={"color": _label_colour(name), "size": 7, "symbol": "circle" if label == 1 else "x"},
                text=[_hover(acts.metadata[rows[local]], rows[local]) for local in picked], hovertemplate="%{text}<extra></extra>",
            ), row=r, col=c)
    figure.update_xaxes(showticklabels=False)
    figure.update_yaxes(showticklabels=False)
    figure.update_layout(title=title or f"Each user's pairs at {site}: 2-D PCA per user", template="plotly_white",
                         height=260 * max(rows_n, 1) + 80, margin={"t": 90})
    return figure


def _label_colour(label: str) -> str:
    return {"personalised": "#d62728", "neutral": "#1f77b4"}.get(label, "#7f7f7f")


def probe_similarity(a: Probe, b: Probe) -> float:
    """Similarity of two probes in ``[-1, 1]``.

    Two directions: their cosine (sign matters: both are oriented personalised-positive). Anything
    involving a subspace: ``sqrt(‖A Bᵀ‖²_F / min(k_a, k_b))`` with ``A``, ``B`` orthonormal bases —
    the root-mean-square cosine of the principal angles, in ``[0, 1]`` (subspaces have no sign).
    """
    if isinstance(a, Direction) and isinstance(b, Direction):
        va, vb = a.vector.double().flatten(), b.vector.double().flatten()
        return float(va @ vb / (va.norm() * vb.norm()).clamp_min(1e-30))
    basis_a, basis_b = _basis(a), _basis(b)
    overlap = (basis_a @ basis_b.T).pow(2).sum() / min(basis_a.shape[0], basis_b.shape[0])
    return float(overlap.clamp(0.0, 1.0).sqrt())


def _basis(probe: Probe) -> torch.Tensor:
    if isinstance(probe, Subspace):
        return probe.basis.double()
    vector = probe.vector.double().flatten()
    return (vector / vector.norm().clamp_min(1e-30))[None]


def similarity_matrix(probes: Sequence[Probe]) -> torch.Tensor:
    """``[n, n]`` matrix of :func:`probe_similarity` between every two probes (float64)."""
    n = len(probes)
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = probe_similarity(probes[i], probes[j])
    return out


def _heatmap(labels: list[str], matrix: torch.Tensor, title: str, axis_title: str) -> go.Figure:
    values = matrix.tolist()
    text = [[f"{v:.2f}" for v in row] for row in values]
    figure = go.Figure(go.Heatmap(
        z=values, x=labels, y=labels, zmin=-1.0, zmax=1.0, colorscale="RdBu", reversescale=True,
        text=text, texttemplate="%{text}" if len(labels) <= 24 else None,
        hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>", colorbar={"title": {"text": "cosine"}},
    ))
    size = max(360, min(900, 140 + 28 * len(labels)))
    figure.update_layout(
        title=title, template="plotly_white", height=size + 40, width=max(size + 120, 640),
        xaxis={"title": axis_title, "type": "category"}, yaxis={"title": axis_title, "type": "category", "autorange": "reversed"},
    )
    return figure


def direction_similarity_across_layers(probes: Sequence[Probe], method: str, user_id: str = POOLED) -> go.Figure:
    """Heatmap of the similarity (:func:`probe_similarity`) between one method's probes at different sites.

    Only probes of ``method`` for ``user_id`` (``POOLED`` = probes fitted on all users) are used,
    ordered by layer then site kind. A block of high similarity along the diagonal means the
    personalisation direction is carried unchanged through those layers.
    """
    chosen = sorted(
        (p for p in probes if p.method == method and user_key(p.user_id) == user_id), key=lambda p: site_order(p.site),
    )
    if not chosen:
        raise ValueError(f"no probes of method {method!r} for user {user_id!r}")
    who = "pooled" if user_id == POOLED else f"user {user_id}"
    return _heatmap([p.site for p in chosen], similarity_matrix(chosen), f"{method}: similarity of directions across sites<br><sup>{who}</sup>", "site")


def direction_similarity_across_users(probes: Sequence[Probe], site: str, method: str) -> go.Figure:
    """Heatmap of the similarity between users' probes of ``method`` at ``site``.

    Users are in sorted order; the pooled probe (fitted on all users), when present, comes first
    as ``"pooled"``. High off-diagonal values mean users share one personalisation direction.
    """
    chosen = [p for p in probes if p.method == method and p.site == site]
    pooled = [p for p in chosen if p.user_id is None or p.user_id == POOLED]
    per_user = sorted((p for p in chosen if p.user_id is not None and p.user_id != POOLED), key=lambda p: str(p.user_id))
    ordered = pooled[:1] + per_user
    if not per_user:
        raise ValueError(f"no per-user probes of method {method!r} at site {site!r}")
    labels = ["pooled"] * len(pooled[:1]) + [str(p.user_id) for p in per_user]
    return _heatmap(labels, similarity_matrix(ordered), f"{method} at {site}<br><sup>similarity of users' directions</sup>", "user")
