"""The main job on the embedded default model (grows with each stage of the pipeline).

Now: capture the hidden states of the built-in formal/casual texts at every ``resid_post`` site and
write a self-contained plotly HTML (plotly.js embedded, opens offline) of their 2-D PCA by layer.
"""

from __future__ import annotations

import time
from pathlib import Path

from .builtin import style_texts
from .capture import capture
from .io import atomic_write_text
from .models import DEFAULT_MODEL, load_model
from .plots import pca_by_layer


def run_demo(model_spec: str = DEFAULT_MODEL, out_dir: str | Path = "runs/demo", *, position: str = "mean", batch_size: int = 8) -> Path:
    """Run the demo and return the path of the HTML report; prints the time of each stage."""
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    model, tokenizer = load_model(model_spec)
    timings["load model"] = time.perf_counter() - start

    rows = style_texts()
    start = time.perf_counter()
    acts = capture(
        model, tokenizer, [row["text"] for row in rows], sites="resid_post", position=position,
        # Skip token 0: its residual norm (~20k, the attention sink) would dominate means and PCA.
        span=(1, None), batch_size=batch_size, metadata=rows, out_dir=out_dir / "activations",
    )
    timings["capture"] = time.perf_counter() - start

    start = time.perf_counter()
    figure = pca_by_layer(
        acts, [row["style"] for row in rows], hover=[row["text"] for row in rows],
        title=f"Formal vs casual texts: 2-D PCA of resid_post ({position} over tokens), {acts.model_name}",
    )
    report = out_dir / "pca_by_layer.html"
    atomic_write_text(report, figure.to_html(include_plotlyjs=True, full_html=True))
    timings["figure"] = time.perf_counter() - start

    for stage, seconds in timings.items():
        print(f"{stage:>12}: {seconds:6.1f} s")
    print(f"{acts.n_items} texts x {len(acts.sites)} sites captured in {out_dir / 'activations'}")
    print(f"report: {report}")
    return report
