"""Plotly figures of captured activations (each function returns a ``plotly.graph_objects.Figure``)."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
import torch

from ..capture.activations import Activations

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project rows of ``x`` ``[n, d]`` on their first two principal components.

    Returns ``(coords [n, 2], explained_variance_ratio [2])``; computed in float64 on centred data.
    The sign of each component is fixed so that its largest-magnitude loading is positive, making
    figures reproducible.
    """
    centred = x.double() - x.double().mean(0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * signs
    variance = singular**2
    ratio = variance[:2] / variance.sum().clamp_min(1e-30)
    return centred @ components.T, ratio


def pca_by_layer(
    acts: Activations,
    color_by: Sequence[str],
    *,
    sites: Sequence[str] | None = None,
    hover: Sequence[str] | None = None,
    title: str = "2-D PCA of hidden states by site",
) -> go.Figure:
    """Scatter of the 2-D PCA of each site's activations, with a slider to move between sites.

    Args:
        acts: activations with one row per item (``position`` ``"last"`` or ``"mean"``).
        color_by: one label per item (e.g. style or user id); one colour per distinct label.
        sites: sites to show (default: all captured sites, in order).
        hover: optional text per item shown on hover (e.g. the input text).
    """
    if acts.position == "all":
        raise ValueError("pca_by_layer needs one row per item: capture with position='last' or 'mean'")
    if len(color_by) != acts.n_items:
        raise ValueError(f"color_by has {len(color_by)} labels for {acts.n_items} items")
    sites = list(sites or acts.sites)
    labels = list(dict.fromkeys(color_by))
    figure = go.Figure()
    ratios = []
    for site_index, site in enumerate(sites):
        coords, ratio = pca_2d(acts[site])
        ratios.append(ratio)
        for label_index, label in enumerate(labels):
            rows = [i for i, value in enumerate(color_by) if value == label]
            figure.add_trace(go.Scattergl(
                x=coords[rows, 0].tolist(), y=coords[rows, 1].tolist(), mode="markers", name=str(label),
                legendgroup=str(label), showlegend=True, visible=site_index == 0,
                marker={"color": _PALETTE[label_index % len(_PALETTE)], "size": 8, "opacity": 0.8},
                text=[hover[i] for i in rows] if hover is not None else None,
                hovertemplate="%{text}<extra>" + str(label) + "</extra>" if hover is not None else None,
            ))
    per_site = len(labels)
    steps = []
    for site_index, site in enumerate(sites):
        visible = [site_index * per_site <= t < (site_index + 1) * per_site for t in range(len(sites) * per_site)]
        pc1, pc2 = (100 * ratios[site_index]).tolist()
        steps.append({
            "method": "update", "label": site,
            "args": [{"visible": visible}, {"xaxis.title.text": f"PC1 ({pc1:.0f}% var)", "yaxis.title.text": f"PC2 ({pc2:.0f}% var)"}],
        })
    pc1, pc2 = (100 * ratios[0]).tolist()
    figure.update_layout(
        title=title, template="plotly_white", height=560,
        xaxis_title=f"PC1 ({pc1:.0f}% var)", yaxis_title=f"PC2 ({pc2:.0f}% var)",
        sliders=[{"active": 0, "currentvalue": {"prefix": "site: "}, "steps": steps, "pad": {"t": 40}}],
    )
    return figure
