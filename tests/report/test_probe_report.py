"""Probe figures, explanations (logit lens, top texts), the HTML report and the ``repedit probe`` CLI.

Most tests build synthetic :class:`ProbeReport`s and :class:`Activations` with known numbers, so the
figures' data can be checked exactly; the logit lens is checked against a hand computation on a tiny
Llama; the report is rendered in headless Chromium when it is installed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from repedit.capture.activations import Activations
from repedit.io import InputError
from repedit.probes.explain import logit_lens, norm_gain, top_texts, unembed_direction
from repedit.probes.types import POOLED, Direction, ProbeReport, ProbeRow, Subspace
from repedit.report.probe_plots import (
    accuracy_by_layer,
    direction_similarity_across_layers,
    direction_similarity_across_users,
    pairs_by_user,
    pairs_scatter,
    probe_similarity,
)
from repedit.report.probe_report import find_probe, item_texts, write_report

D = 16
LAYERS = 4
METHODS = ("diff_of_means", "logistic_regression")
USERS = ("alice", "bob", "carol")


def _unit(seed: int, d: int = D) -> torch.Tensor:
    vector = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return vector / vector.norm()


def make_acts(n_pairs_per_user: int = 4, users: tuple[str, ...] = USERS, offset: float = 6.0, seed: int = 0) -> Activations:
    """Pairs whose personalised member is the neutral one plus ``offset`` along ``_unit(99)``, at every layer."""
    generator = torch.Generator().manual_seed(seed)
    metadata, rows = [], []
    pair = 0
    for user in users:
        for prompt_index in range(n_pairs_per_user):
            neutral = torch.randn(D, generator=generator, dtype=torch.float64)
            for label in (1, 0):
                metadata.append({"label": label, "pair_id": pair, "user_id": user, "prompt": f"prompt <{prompt_index}>", "source": "synthetic"})
                rows.append(neutral + offset * _unit(99) if label else neutral)
            pair += 1
    x = torch.stack(rows).float()
    sites = [f"resid_post.{layer}" for layer in range(LAYERS)]
    return Activations(
        sites=sites, position="mean", span="response", d_model=D, n_tokens=torch.ones(len(rows), dtype=torch.long),
        model_fingerprint="llama-test", metadata=metadata, _tensors={site: x * (layer + 1) for layer, site in enumerate(sites)},
    )


def make_report(with_subspace: bool = False) -> ProbeReport:
    """Rows with known numbers: accuracy rises with the layer; layer 2 (logistic regression) is selected."""
    rows, probes = [], []
    for method_index, method in enumerate(METHODS):
        for user in (POOLED, *USERS):
            for layer in range(LAYERS):
                accuracy = 0.6 + 0.1 * layer - 0.05 * method_index
                control = 0.5 + 0.01 * layer
                rows.append(ProbeRow(
                    site=f"resid_post.{layer}", layer=layer, method=method, user_id=user, accuracy=accuracy, accuracy_std=0.02,
                    control_accuracy=control, selectivity=accuracy - control, margin=1.0 + layer, n_pairs=12, folds=3,
                ))
                probes.append(Direction(
                    vector=_unit(100 * method_index + 10 * layer + USERS.index(user) + 1 if user != POOLED else 100 * method_index + 10 * layer),
                    site=f"resid_post.{layer}", method=method, scale=2.0, user_id=None if user == POOLED else user,
                    model_fingerprint="llama-test", data_hash="abc",
                ))
    if with_subspace:
        basis = torch.linalg.qr(torch.randn(D, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))[0].T
        probes.append(Subspace(basis=basis, site="resid_post.2", method="svd_subspace", center=torch.zeros(D, dtype=torch.float64)))
    selected = [
        {"site": "resid_post.2", "method": "logistic_regression", "user_id": POOLED, "selectivity": 0.23, "accuracy": 0.75, "margin": 3.0},
        {"site": "resid_post.3", "method": "diff_of_means", "user_id": POOLED, "selectivity": 0.27, "accuracy": 0.9, "margin": 4.0},
        {"site": "resid_post.1", "method": "diff_of_means", "user_id": "bob", "selectivity": 0.19, "accuracy": 0.7, "margin": 2.0},
    ]
    return ProbeReport(rows=rows, probes=probes, selected=selected, model_fingerprint="llama-test", data_hash="abc", settings={"folds": 3})


def _traces(figure, series: str) -> list:
    return [trace for trace in figure.data if isinstance(trace.meta, dict) and trace.meta.get("series") == series]


# ----------------------------------------------------------------------------------------- figures


def test_accuracy_by_layer_has_one_line_per_method_with_the_rows_numbers():
    report = make_report()
    figure = accuracy_by_layer(report)
    accuracy = _traces(figure, "accuracy")
    assert [trace.name for trace in accuracy] == list(METHODS)
    for method_index, trace in enumerate(accuracy):
        assert list(trace.x) == list(range(LAYERS))
        assert list(trace.y) == pytest.approx([0.6 + 0.1 * layer - 0.05 * method_index for layer in range(LAYERS)])
        assert trace.yaxis == "y"
    control = _traces(figure, "control")
    assert len(control) == len(METHODS)
    assert list(control[0].y) == pytest.approx([0.5 + 0.01 * layer for layer in range(LAYERS)])
    selectivity = _traces(figure, "selectivity")
    assert [trace.yaxis for trace in selectivity] == ["y2", "y2"]
    assert list(selectivity[1].y) == pytest.approx([0.55 + 0.1 * layer - 0.5 - 0.01 * layer for layer in range(LAYERS)])
    (chance,) = _traces(figure, "chance")
    assert set(chance.y) == {0.5}
    # Only the two pooled selections are starred on the pooled plot, at their (layer, accuracy).
    (selected,) = _traces(figure, "selected")
    assert list(selected.x) == [2, 3]
    assert list(selected.y) == pytest.approx([0.75, 0.9])
    assert figure.layout.xaxis2.title.text == "layer"


def test_accuracy_by_layer_per_user_marks_that_users_selection():
    figure = accuracy_by_layer(make_report(), "bob")
    (selected,) = _traces(figure, "selected")
    assert list(selected.x) == [1]
    assert "bob" in figure.layout.title.text
    with pytest.raises(ValueError, match="no probe rows for user 'dave'"):
        accuracy_by_layer(make_report(), "dave")


def test_accuracy_by_layer_splits_site_kinds():
    report = make_report()
    extra = [ProbeRow(**{**row.__dict__, "site": f"mlp_out.{row.layer}"}) for row in report.rows if row.method == "diff_of_means"]
    report.rows.extend(extra)
    names = [trace.name for trace in _traces(accuracy_by_layer(report), "accuracy")]
    assert names == ["diff_of_means · resid_post", "diff_of_means · mlp_out", "logistic_regression · resid_post"]


def test_pairs_scatter_by_label_has_n_points_per_class_and_pair_lines():
    acts = make_acts()
    n_pairs = 4 * len(USERS)
    figure = pairs_scatter(acts, "resid_post.1", color_by="label")
    points = {trace.name: trace for trace in _traces(figure, "points")}
    assert set(points) == {"personalised", "neutral"}
    assert len(points["personalised"].x) == len(points["neutral"].x) == n_pairs
    # Symbols encode users: one legend entry per user, and three distinct symbols among the points.
    assert [trace.name for trace in _traces(figure, "symbol-legend")] == [f"user {user}" for user in USERS]
    assert len(set(points["personalised"].marker.symbol)) == len(USERS)
    # Pair lines: (x1, x2, None) per pair, joining the PCA coordinates of the two members.
    (lines,) = _traces(figure, "pairs")
    assert len(lines.x) == 3 * n_pairs and lines.x[2] is None
    # PCA of the planted offset: personalised and neutral separate along PC1 (the offset dominates the variance).
    pc1_pos = sum(points["personalised"].x) / n_pairs
    pc1_neg = sum(points["neutral"].x) / n_pairs
    assert abs(pc1_pos - pc1_neg) > 2.0
    # Hover text comes from the metadata, with the prompt's angle brackets escaped.
    assert "user alice" in points["personalised"].text[0] and "prompt &lt;0&gt;" in points["personalised"].text[0]


def test_pairs_by_user_is_each_users_own_pca():
    from repedit.report.plots import pca_2d

    acts = make_acts()
    figure = pairs_by_user(acts, "resid_post.1", columns=2)
    assert len(figure.layout.annotations) == len(USERS)  # one titled panel per user
    for index, user in enumerate(USERS):
        rows = [i for i, m in enumerate(acts.metadata) if m["user_id"] == user]
        coords, _ = pca_2d(acts["resid_post.1"][rows])
        lines, personalised, neutral = figure.data[3 * index: 3 * index + 3]
        assert len(lines.x) == 3 * len(rows) // 2  # one segment (+ gap) per pair
        expected = [float(coords[k, 0]) for k, i in enumerate(rows) if acts.metadata[i]["label"] == 1]
        assert personalised.name == "personalised" and list(personalised.x) == pytest.approx(expected)
        assert neutral.name == "neutral" and len(neutral.x) == len(rows) // 2


def test_pairs_scatter_by_user_and_without_lines():
    acts = make_acts()
    figure = pairs_scatter(acts, "resid_post.0", color_by="user", connect_pairs=False)
    points = _traces(figure, "points")
    assert [trace.name for trace in points] == list(USERS)
    assert all(len(trace.x) == 8 for trace in points)
    assert set(points[0].marker.symbol) == {"circle", "x"}  # personalised / neutral
    assert _traces(figure, "pairs") == []
    with pytest.raises(ValueError, match="color_by"):
        pairs_scatter(acts, "resid_post.0", color_by="prompt")
    # More users than colours: the rest are grouped.
    many = make_acts(n_pairs_per_user=1, users=tuple(f"u{i}" for i in range(5)))
    groups = [trace.name for trace in _traces(pairs_scatter(many, "resid_post.0", "user", max_users=3), "points")]
    assert groups == ["u0", "u1", "other users"]


def test_similarity_across_layers_of_identical_directions_is_all_ones():
    vector = _unit(7)
    probes = [Direction(vector=vector.clone(), site=f"resid_post.{layer}", method="m") for layer in (2, 0, 1)]
    probes.append(Direction(vector=-vector, site="resid_post.3", method="m"))
    probes.append(Direction(vector=_unit(8), site="resid_post.0", method="other"))
    figure = direction_similarity_across_layers(probes, "m")
    (heatmap,) = figure.data
    assert list(heatmap.x) == [f"resid_post.{layer}" for layer in range(4)]  # sorted by layer
    z = torch.tensor(heatmap.z, dtype=torch.float64)
    assert torch.allclose(z.diagonal(), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(z[:3, :3], torch.ones(3, 3, dtype=torch.float64))
    assert torch.allclose(z[3, :3], -torch.ones(3, dtype=torch.float64))  # sign matters for directions
    with pytest.raises(ValueError, match="no probes"):
        direction_similarity_across_layers(probes, "m", user_id="alice")


def test_similarity_across_users_matches_hand_cosines():
    report = make_report()
    figure = direction_similarity_across_users(report.probes, "resid_post.1", "diff_of_means")
    (heatmap,) = figure.data
    assert list(heatmap.x) == ["pooled", *USERS]
    z = torch.tensor(heatmap.z, dtype=torch.float64)
    vectors = [find_probe(report.probes, "resid_post.1", "diff_of_means", user).vector for user in (POOLED, *USERS)]
    expected = torch.stack(vectors) @ torch.stack(vectors).T
    assert torch.allclose(z, expected, atol=1e-12)
    assert torch.allclose(z.diagonal(), torch.ones(4, dtype=torch.float64))


def test_subspace_similarity_is_rms_principal_cosine():
    basis = torch.eye(D, dtype=torch.float64)[:2]
    inside = Direction(vector=torch.eye(D, dtype=torch.float64)[0], site="s.0", method="m")
    outside = Direction(vector=torch.eye(D, dtype=torch.float64)[5], site="s.0", method="m")
    subspace = Subspace(basis=basis, site="s.0", method="m")
    assert probe_similarity(inside, subspace) == pytest.approx(1.0)
    assert probe_similarity(outside, subspace) == pytest.approx(0.0)
    half = Subspace(basis=torch.eye(D, dtype=torch.float64)[1:3], site="s.0", method="m")
    assert probe_similarity(subspace, half) == pytest.approx((1 / 2) ** 0.5)


# ------------------------------------------------------------------------------------- explanations


def test_norm_gain_matches_each_architectures_convention(tiny_model):
    """Gemma-family norms store gain - 1; LayerNorms centre; the detected gain reproduces the module."""
    for arch, plus_one, centres in (("llama", False, False), ("gemma", True, False), ("gpt2", False, True)):
        model = copy.deepcopy(tiny_model(arch))
        from repedit.model.arch import get_adapter

        norm = get_adapter(model).final_norm
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(-0.5, 1.5, norm.weight.numel()))
        gain, found_centres = norm_gain(norm, norm.weight.numel())
        expected = norm.weight.detach() + (1.0 if plus_one else 0.0)
        assert torch.allclose(gain, expected), arch
        assert found_centres == centres, arch


def test_logit_lens_equals_hand_computation_on_tiny_llama(tiny_model, tokenizer):
    model = copy.deepcopy(tiny_model("llama"))
    from repedit.model.arch import get_adapter

    adapter = get_adapter(model)
    with torch.no_grad():  # a non-trivial norm gain, so that forgetting it would change the result
        adapter.final_norm.weight.copy_(torch.rand(adapter.d_model, generator=torch.Generator().manual_seed(1)) * 2)
    vector = _unit(3, adapter.d_model)
    direction = Direction(vector=vector, site="resid_post.2", method="diff_of_means")
    hand = (adapter.unembed.weight.detach().double() @ (adapter.final_norm.weight.detach().double() * vector))[: len(tokenizer)]
    assert torch.allclose(unembed_direction(direction, model, len(tokenizer)).double(), hand, atol=1e-5)
    lens = logit_lens(direction, model, tokenizer, k=10)
    order = torch.argsort(hand, descending=True)
    assert lens["promoted_ids"] == order[:10].tolist()
    assert lens["suppressed_ids"] == order.flip(0)[:10].tolist()
    values = [value for _, value in lens["promoted"]]
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(float(hand.max()), abs=1e-5)
    assert [value for _, value in lens["suppressed"]][0] == pytest.approx(float(hand.min()), abs=1e-5)
    assert lens["promoted"][0][0] == tokenizer.decode([lens["promoted_ids"][0]])
    assert lens["site"] == "resid_post.2" and lens["vocab_size"] == len(tokenizer)
    # Negating the direction swaps the two lists.
    flipped = logit_lens(-vector, model, tokenizer, k=10)
    assert flipped["promoted_ids"] == lens["suppressed_ids"]
    with pytest.raises(InputError, match="d_model"):
        logit_lens(torch.ones(adapter.d_model + 1), model, tokenizer)


def test_logit_lens_skips_padded_vocabulary_rows(tiny_model):
    model = tiny_model("llama")
    direction = _unit(4, 64)

    class FakeTokenizer:
        def __len__(self) -> int:
            return 100

        def decode(self, ids: list[int]) -> str:
            return f"tok{ids[0]}"

    lens = logit_lens(direction, model, FakeTokenizer(), k=5)
    assert lens["vocab_size"] == 100
    assert all(index < 100 for index in lens["promoted_ids"] + lens["suppressed_ids"])
    assert lens["promoted"][0][0] == f"tok{lens['promoted_ids'][0]}"


def test_top_texts_returns_the_highest_and_lowest_scoring_items():
    acts = make_acts()
    texts = [f"text {i}" for i in range(acts.n_items)]
    vector = _unit(11)
    direction = Direction(vector=vector, site="resid_post.2", method="m")
    found = top_texts(direction, acts, texts, k=3)
    scores = acts["resid_post.2"].double() @ vector
    order = torch.argsort(scores, descending=True).tolist()
    assert [index for _, _, index in found["highest"]] == order[:3]
    assert [text for text, _, _ in found["highest"]] == [texts[i] for i in order[:3]]
    assert [index for _, _, index in found["lowest"]] == order[::-1][:3]
    assert found["highest"][0][1] == pytest.approx(float(scores.max()), rel=1e-5)
    # Along the planted offset, the top items are personalised and the bottom ones neutral.
    planted = top_texts(_unit(99), acts, texts, site="resid_post.0", k=4)
    assert all(acts.metadata[i]["label"] == 1 for _, _, i in planted["highest"])
    assert all(acts.metadata[i]["label"] == 0 for _, _, i in planted["lowest"])
    with pytest.raises(InputError, match="one text per item"):
        top_texts(direction, acts, texts[:-1])


def test_top_texts_of_a_subspace_uses_its_score():
    acts = make_acts()
    subspace = Subspace(basis=_unit(99)[None], site="resid_post.0", method="svd", center=torch.zeros(D, dtype=torch.float64))
    found = top_texts(subspace, acts, item_texts(acts), k=2)
    expected = (acts["resid_post.0"].double() @ _unit(99)).abs()
    assert [i for _, _, i in found["highest"]] == torch.argsort(expected, descending=True)[:2].tolist()


# ------------------------------------------------------------------------------------------ report


def test_write_report_embeds_figures_once_and_round_trips(tmp_path, tiny_model, tokenizer):
    report = make_report(with_subspace=True)
    acts = make_acts()
    # Directions of the tiny model's width, so the logit lens can run on the synthetic probes.
    model = tiny_model("llama")
    for probe in report.probes:
        if isinstance(probe, Direction):
            probe.vector = torch.nn.functional.pad(probe.vector, (0, 64 - D))
    acts_64 = Activations(**{**acts.__dict__, "d_model": 64, "_tensors": {s: torch.nn.functional.pad(t, (0, 64 - D)) for s, t in acts._tensors.items()}})
    texts = [f"response number {i} <b>" for i in range(acts.n_items)]
    path = write_report(report, acts_64, tmp_path / "out", texts=texts, model=model, tokenizer=tokenizer, top_tokens=5)
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text(encoding="utf-8")
    # plotly.js embedded exactly once (its licence banner), and one newPlot per figure.
    assert page.count("plotly.js v") == 1
    figure_ids = re.findall(r'<div id="([\w-]+)" class="plotly-graph-div"', page)
    expected_ids = ["accuracy-pooled", "scatter-label", "scatter-user", "similarity-layers-diff-of-means",
                    "similarity-layers-logistic-regression", "similarity-users",
                    *[f"accuracy-user-{i}" for i in range(len(USERS))]]
    assert figure_ids == expected_ids
    assert page.count("Plotly.newPlot(") == len(expected_ids)
    # The figures' data is in the page: the pooled accuracy series of diff_of_means.
    series = [0.6 + 0.1 * layer for layer in range(LAYERS)]
    assert '"y":' + json.dumps(series, separators=(",", ":")) in page
    # Selected-sites table, explanations (logit lens and top texts, escaped) for the first three selections.
    assert page.count("<h3>#") == 3
    assert "response number" in page and "&lt;b&gt;" in page and "<b>\"" not in page
    assert "promoted token" in page
    # Numbers and probes round-trip.
    loaded = ProbeReport.load(tmp_path / "out")
    assert loaded.rows == report.rows and loaded.selected == report.selected
    assert len(loaded.probes) == len(report.probes)
    assert torch.allclose(loaded.probes[0].vector, report.probes[0].vector.float())
    explained = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert [record["site"] for record in explained] == ["resid_post.2", "resid_post.3", "resid_post.1"]
    assert explained[2]["user_id"] == "bob"
    assert len(explained[0]["logit_lens"]["promoted"]) == 5 and len(explained[0]["top_texts"]["highest"]) == 5
    lens = logit_lens(find_probe(report.probes, "resid_post.2", "logistic_regression"), model, tokenizer, k=5)
    assert explained[0]["logit_lens"]["promoted_ids"] == lens["promoted_ids"]
    # No temporary files are left behind by the atomic writes.
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_write_report_without_model_or_texts_or_users(tmp_path):
    report = make_report()
    report.rows = [row for row in report.rows if row.user_id == POOLED]
    report.probes = [probe for probe in report.probes if probe.user_id is None]
    report.selected = report.selected[:2]
    page = write_report(report, make_acts(), tmp_path).read_text(encoding="utf-8")
    assert "accuracy-user-0" not in page and "similarity-users" not in page
    assert "Give a model (logit lens) or item texts" in page
    assert json.loads((tmp_path / "explain.json").read_text()) == []


def test_item_texts_falls_back_to_label_user_and_prompt():
    acts = make_acts(n_pairs_per_user=1, users=("alice",))
    assert item_texts(acts) == ["[personalised] alice: prompt <0>", "[neutral] alice: prompt <0>"]
    acts.metadata[0]["response"] = "x" * 400
    assert item_texts(acts, max_chars=10)[0] == "x" * 9 + "…"


# --------------------------------------------------------------------------------------- rendering


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) into rows of pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks, header = 8, [], None
    while position < len(data):
        (length,), kind = struct.unpack(">I", data[position:position + 4]), data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        filter_type = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            upper_left = previous[i - channels] if i >= channels else 0
            if filter_type == 1:
                line[i] = (line[i] + left) & 0xFF
            elif filter_type == 2:
                line[i] = (line[i] + up) & 0xFF
            elif filter_type == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif filter_type == 4:
                p = left + up - upper_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else upper_left)
                line[i] = (line[i] + predictor) & 0xFF
        rows.append(bytes(line[:stride]))
        previous = line
    return width, height, [bytes(b for k, b in enumerate(row) if k % channels < 3) for row in rows]


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    """The written HTML really draws plots offline: the screenshot has many colours, incl. the traces'."""
    report = make_report()
    page = write_report(report, make_acts(), tmp_path / "out", texts=[f"t{i}" for i in range(24)])
    screenshot = tmp_path / "shot.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,1400",
        "--virtual-time-budget=5000", f"--screenshot={screenshot}", page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert screenshot.exists(), result.stderr.decode(errors="replace")[-2000:]
    width, height, rows = _png_pixels(screenshot)
    assert (width, height) == (1100, 1400)
    # Every other pixel of every other row: enough to see lines, 4x cheaper to scan in pure Python.
    sample = [row[i:i + 3] for row in rows[::2] for i in range(0, len(row), 6)]
    colours = set(sample)
    # Measured: the page without plotly.js (tables and text only) has ~220 colours, the drawn page ~1100.
    assert len(colours) > 400, f"only {len(colours)} distinct colours: the figures look blank"

    def count(rgb: tuple[int, int, int]) -> int:
        return sum(1 for c in sample if abs(c[0] - rgb[0]) + abs(c[1] - rgb[1]) + abs(c[2] - rgb[2]) < 30)

    # The pooled accuracy plot's two method lines (plotly blue #1f77b4 and red #d62728) are drawn;
    # nothing else on the page uses these colours (~450 sampled pixels each when drawn, 0 when not).
    assert count((0x1F, 0x77, 0xB4)) > 100
    assert count((0xD6, 0x27, 0x28)) > 100


# --------------------------------------------------------------------------------------------- CLI


def _tiny_pairs() -> list:
    """Two users x four prompts; personalised answers are casual with emoji, neutral ones formal."""
    from repedit.pairs.synthesis import Pair

    prompts = ["How do I boil an egg?", "What is a good name for a cat?", "Recommend a book.", "How should I start running?"]
    casual = {"alice": "omg just do it!! 🥚🔥 lol so easy", "bob": "yo dude honestly whatever works 😎🤙"}
    return [
        Pair(user_id=user, prompt=prompt, personalized=f"{casual[user]} ({index})",
             neutral=f"Certainly. Here is a concise and formal answer to the question ({index}).")
        for user in ("alice", "bob") for index, prompt in enumerate(prompts)
    ]


@pytest.fixture(scope="module")
def tiny_probe_inputs(tmp_path_factory, tiny_model, tokenizer):
    """Pair activations of the tiny Llama (saved), and the model + tokenizer saved as a local folder."""
    from repedit.probes.data import capture_pairs

    root = tmp_path_factory.mktemp("probe-cli")
    model = tiny_model("llama")
    acts = capture_pairs(model, tokenizer, _tiny_pairs(), sites="resid_post", progress=False)
    acts.save(root / "acts")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def test_cli_probe_end_to_end(tiny_probe_inputs, tmp_path, capsys):
    from repedit.cli.main import main

    out = tmp_path / "report"
    code = main([
        "probe", "--acts", str(tiny_probe_inputs / "acts"), "--out", str(out), "--methods", "diff_of_means",
        "logistic_regression", "--folds", "2", "--top", "2", "--min-user-pairs", "4", "--model", str(tiny_probe_inputs / "model"),
    ])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    loaded = ProbeReport.load(out)
    # 3 sites (tiny model's layers) x 2 methods x (pooled + 2 users), a probe for each, 2 selected sites.
    assert len(loaded.rows) == 3 * 2 * 3 and len(loaded.probes) == 3 * 2 * 3
    assert {row.user_id for row in loaded.rows} == {POOLED, "alice", "bob"}
    assert len(loaded.selected) == 2
    for rank, entry in enumerate(loaded.selected, start=1):
        assert f"#{rank} {entry['site']} {entry['method']}:" in printed.out
    assert f"report -> {out / 'report.html'}" in printed.out
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("plotly.js v") == 1 and "accuracy-user-1" in page
    explained = json.loads((out / "explain.json").read_text())
    assert [record["site"] for record in explained] == [entry["site"] for entry in loaded.selected]
    # The logit lens ran on the saved model; the texts fall back to "[label] user: prompt".
    assert len(explained[0]["logit_lens"]["promoted"]) == 20
    assert explained[0]["top_texts"]["highest"][0][0].startswith(("[personalised] ", "[neutral] "))


def test_cli_probe_refuses_a_different_model(tiny_probe_inputs, tmp_path, tiny_model, tokenizer, capsys):
    from repedit.cli.main import main

    other = tmp_path / "other-model"
    tiny_model("llama", seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    code = main(["probe", "--acts", str(tiny_probe_inputs / "acts"), "--out", str(tmp_path / "out"), "--methods", "diff_of_means",
                 "--folds", "2", "--model", str(other)])
    assert code == 2
    assert "is not the model the activations" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
