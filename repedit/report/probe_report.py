"""One self-contained HTML report of a probing run, plus its numbers as JSON.

:func:`write_report` writes, into ``out_dir``:

* ``report.html`` — opens offline: plotly.js is embedded once (with the first figure) and every
  other figure reuses it. Sections: summary, selected sites, accuracy by layer (pooled), the pairs
  at the best selected site (coloured by label and by user), direction similarity across sites and
  across users, explanations of the selected probes (logit lens when a model is given, top texts
  when texts are given), accuracy by layer per user;
* ``report.json`` + ``probes.safetensors`` + ``probes.json`` — :meth:`ProbeReport.save` (reload with
  :meth:`ProbeReport.load`);
* ``explain.json`` — the explanations shown in the HTML (token lists, top texts).

Every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..capture.activations import Activations
from ..io import write_json
from ..probes.explain import logit_lens, top_texts
from ..probes.types import POOLED, Direction, Probe, ProbeReport
from .htmlpage import Figures, esc, num_cell, write_page
from .probe_plots import accuracy_by_layer, direction_similarity_across_layers, direction_similarity_across_users, pairs_scatter, user_key


def item_texts(acts: Activations, max_chars: int = 300) -> list[str]:
    """One display text per item, from its metadata.

    Uses the item's ``response`` or ``text`` field when there is one; otherwise (what
    :func:`repedit.probes.capture_pairs` stores) ``"[personalised|neutral] user: prompt"``, which still
    shows which users and prompts sit at the ends of a direction.
    """
    out = []
    for meta in acts.metadata:
        text = meta.get("response") or meta.get("text") or meta.get("personalized")
        if not isinstance(text, str) or not text:
            label = {1: "personalised", 0: "neutral"}.get(int(meta["label"])) if meta.get("label") is not None else "?"
            text = f"[{label}] {meta.get('user_id', '?')}: {meta.get('prompt', '')}"
        out.append(text if len(text) <= max_chars else text[: max_chars - 1] + "…")
    return out


def find_probe(probes: Sequence[Probe], site: str, method: str, user_id: str | None = POOLED) -> Probe | None:
    """The probe fitted at ``site`` with ``method`` for ``user_id`` (``POOLED``/``None`` = all users)."""
    wanted = user_key(user_id)
    for probe in probes:
        if probe.site == site and probe.method == method and user_key(probe.user_id) == wanted:
            return probe
    return None


def _token(text: str) -> str:
    # JSON quoting makes leading spaces, newlines and empty tokens visible.
    return f"<code>{esc(json.dumps(text, ensure_ascii=False))}</code>"


def _selected_table(report: ProbeReport) -> str:
    if not report.selected:
        return '<p class="note">No site was selected.</p>'
    head = "<tr><th>#</th><th>site</th><th>method</th><th>user</th><th>accuracy</th><th>selectivity</th><th>margin (d′)</th></tr>"
    body = []
    for rank, entry in enumerate(report.selected, start=1):
        user = user_key(entry.get("user_id"))
        body.append(
            f"<tr><td>{rank}</td><td>{esc(entry.get('site'))}</td><td>{esc(entry.get('method'))}</td>"
            f"<td>{'pooled' if user == POOLED else esc(user)}</td>{num_cell(entry.get('accuracy'))}{num_cell(entry.get('selectivity'))}"
            f"{num_cell(entry.get('margin'), 2)}</tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _lens_table(lens: dict[str, Any]) -> str:
    rows = []
    for (up, up_value), (down, down_value) in zip(lens["promoted"], lens["suppressed"]):
        rows.append(f"<tr><td>{_token(up)}</td>{num_cell(up_value, 2)}<td>{_token(down)}</td>{num_cell(down_value, 2)}</tr>")
    return (
        "<table><tr><th>promoted token</th><th>logit</th><th>suppressed token</th><th>logit</th></tr>"
        f"{''.join(rows)}</table>"
    )


def _texts_table(found: dict[str, Any], acts: Activations) -> str:
    def rows(entries: list[tuple[str, float, int]]) -> str:
        out = []
        for text, score, index in entries:
            meta = acts.metadata[index] if index < len(acts.metadata) else {}
            label = {1: "personalised", 0: "neutral"}.get(meta.get("label"), "?")
            out.append(f"<tr>{num_cell(score, 2)}<td>{esc(label)}</td><td>{esc(meta.get('user_id', '?'))}</td><td>{esc(text)}</td></tr>")
        return "".join(out)

    head = "<tr><th>score</th><th>label</th><th>user</th><th>text</th></tr>"
    return (
        f"<p>Highest scores (mean {found['mean']:.2f}, std {found['std']:.2f}):</p><table>{head}{rows(found['highest'])}</table>"
        f"<p>Lowest scores:</p><table>{head}{rows(found['lowest'])}</table>"
    )


def _explanations(
    report: ProbeReport, acts: Activations, texts: Sequence[str] | None, model: Any, tokenizer: Any, max_explained: int, top_tokens: int, top_k_texts: int,
) -> tuple[str, list[dict[str, Any]]]:
    """HTML and JSON records explaining the first ``max_explained`` selected probes."""
    if model is None and texts is None:
        return ('<p class="note">Give a model (logit lens) or item texts (top texts) to explain the selected probes.</p>', [])
    parts: list[str] = []
    records: list[dict[str, Any]] = []
    for rank, entry in enumerate(report.selected[:max_explained], start=1):
        probe = find_probe(report.probes, entry.get("site"), entry.get("method"), entry.get("user_id"))
        if probe is None:
            continue
        user = user_key(probe.user_id)
        record: dict[str, Any] = {"rank": rank, "site": probe.site, "method": probe.method, "user_id": user, "kind": probe.kind}
        parts.append(f"<h3>#{rank}: {esc(probe.method)} at {esc(probe.site)} ({'pooled' if user == POOLED else 'user ' + esc(user)})</h3>")
        if model is not None:
            if isinstance(probe, Direction):
                lens = logit_lens(probe, model, tokenizer, k=top_tokens)
                parts.append("<p>Logit lens (final-norm gain, then unembedding, of the unit direction):</p>")
            else:
                # A subspace basis vector has no meaningful sign: its lens lists both ends.
                lens = logit_lens(probe.basis[0], model, tokenizer, k=top_tokens)
                parts.append("<p>Logit lens of the subspace's first basis vector (its sign is arbitrary):</p>")
            parts.append(_lens_table(lens))
            record["logit_lens"] = {key: lens[key] for key in ("promoted", "suppressed", "promoted_ids", "suppressed_ids", "vocab_size")}
        if texts is not None:
            found = top_texts(probe, acts, texts, probe.site, k=top_k_texts)
            what = "projection on the direction" if isinstance(probe, Direction) else "norm of the component in the subspace"
            parts.append(f"<p>Dataset items by score ({what}):</p>")
            parts.append(_texts_table(found, acts))
            record["top_texts"] = found
        records.append(record)
    return "".join(parts) or '<p class="note">No selected probe to explain.</p>', records


def _best_site(report: ProbeReport) -> tuple[str | None, str | None]:
    """(site, method) of the first selected entry, or of the pooled row with the highest selectivity."""
    if report.selected:
        return report.selected[0].get("site"), report.selected[0].get("method")
    pooled = [row for row in report.rows if row.user_id == POOLED] or list(report.rows)
    if not pooled:
        return None, None
    best = max(pooled, key=lambda row: (row.selectivity, row.accuracy))
    return best.site, best.method


def write_report(
    report: ProbeReport,
    acts: Activations,
    out_dir: str | Path,
    *,
    texts: Sequence[str] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    top_tokens: int = 20,
    top_k_texts: int = 5,
    max_explained: int = 3,
    max_user_plots: int = 12,
    title: str = "Where is personalisation represented?",
) -> Path:
    """Write ``report.html``, ``report.json``, the probes and ``explain.json`` to ``out_dir``.

    Args:
        report: the probing result (:func:`repedit.probes.probe_sites`).
        acts: the activations it was computed from (for the pairs scatter and the top texts).
        texts: one display text per item (e.g. :func:`item_texts`); enables the top-texts tables.
        model, tokenizer: the model the activations come from; enables the logit lens.
        top_tokens, top_k_texts: list lengths of the logit lens and of the top texts.
        max_explained: how many of the selected probes to explain.
        max_user_plots: at most this many per-user accuracy figures (users in sorted order).

    Returns:
        The path of ``report.html``.
    """
    out_dir = Path(out_dir)
    figure = Figures()
    users = sorted({row.user_id for row in report.rows if row.user_id != POOLED})
    methods = list(dict.fromkeys(row.method for row in report.rows))
    sections: list[str] = []

    summary = (
        f"<table><tr><th>model</th><td><code>{esc(report.model_fingerprint)}</code></td></tr>"
        f"<tr><th>data</th><td><code>{esc(report.data_hash)}</code>; {acts.n_items} items at {len(acts.sites)} sites "
        f"({esc(acts.position)}, span {esc(acts.span)})</td></tr>"
        f"<tr><th>methods</th><td>{esc(', '.join(methods) or '(none)')}</td></tr>"
        f"<tr><th>users</th><td>{len(users)} per-user evaluations{': ' + esc(', '.join(users[:30])) if users else ''}"
        f"{' …' if len(users) > 30 else ''}</td></tr>"
        f"<tr><th>settings</th><td><code>{esc(json.dumps(report.settings, sort_keys=True, default=str))}</code></td></tr></table>"
        '<p class="note">Accuracy is held out over group-aware folds (all pairs of one prompt on one side); the control '
        "is the same probe trained on labels shuffled within pairs, so selectivity = accuracy − control measures what the "
        "site encodes beyond what any probe can memorise.</p>"
    )
    sections.append(f"<h2>Summary</h2>{summary}")
    sections.append(f"<h2>Selected sites</h2>{_selected_table(report)}")

    if any(row.user_id == POOLED for row in report.rows):
        sections.append("<h2>Accuracy by layer (all users)</h2>" + figure(accuracy_by_layer(report, POOLED), "accuracy-pooled"))

    best_site, best_method = _best_site(report)
    if best_site is not None and best_site in acts:
        sections.append(
            f"<h2>Pairs at {esc(best_site)}</h2>"
            '<p class="note">2-D PCA of every item at the best site; grey segments join the two responses of a pair.</p>'
            + figure(pairs_scatter(acts, best_site, "label"), "scatter-label")
            + figure(pairs_scatter(acts, best_site, "user"), "scatter-user")
        )

    similarity = []
    for method in methods:
        pooled_probes = [p for p in report.probes if p.method == method and user_key(p.user_id) == POOLED]
        if len({p.site for p in pooled_probes}) >= 2:
            similarity.append(figure(direction_similarity_across_layers(report.probes, method, POOLED), f"similarity-layers-{_slug(method)}"))
    if best_site is not None and best_method is not None:
        per_user = [p for p in report.probes if p.site == best_site and p.method == best_method and user_key(p.user_id) != POOLED]
        if per_user:
            similarity.append(figure(direction_similarity_across_users(report.probes, best_site, best_method), "similarity-users"))
    if similarity:
        sections.append(
            "<h2>Direction similarity</h2>"
            '<p class="note">Cosine between directions (for subspaces: RMS cosine of the principal angles).</p>' + "".join(similarity)
        )

    explain_html, records = _explanations(report, acts, texts, model, tokenizer, max_explained, top_tokens, top_k_texts)
    sections.append(f"<h2>What the selected probes mean</h2>{explain_html}")

    if users:
        per_user_figures = [figure(accuracy_by_layer(report, user), f"accuracy-user-{index}") for index, user in enumerate(users[:max_user_plots])]
        more = f'<p class="note">{len(users) - max_user_plots} more users are in report.json.</p>' if len(users) > max_user_plots else ""
        sections.append("<h2>Accuracy by layer, per user</h2>" + "".join(per_user_figures) + more)

    sections.append(
        '<p class="note">Files: <code>report.json</code> (every number), <code>probes.safetensors</code> + <code>probes.json</code> '
        "(the probes; load with <code>ProbeReport.load</code>), <code>explain.json</code> (the explanations).</p>"
    )
    report.save(out_dir)
    write_json(out_dir / "explain.json", records)
    return write_page(out_dir / "report.html", title, sections)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text)
