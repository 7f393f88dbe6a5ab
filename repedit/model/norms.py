"""The typical size of a model's residual stream: the yardstick loaded edits are checked against.

:func:`residual_scale` runs one forward pass on a fixed probe sequence (no tokenizer needed: token ids
spread over the vocabulary), takes each block output's (``resid_post.L``) median token norm, the
first position excluded (the attention sink is an outlier, ~20k on the default model against ~100–300
elsewhere), and returns the largest of those medians. Cached per model object; the first call must not
run while another thread uses the model (the server calls it before its engine starts).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .arch import first_tensor, get_adapter

PROBE_LENGTH = 32
_SCALES: "weakref.WeakKeyDictionary[nn.Module, float | None]" = weakref.WeakKeyDictionary()


def _probe_ids(vocab_size: int) -> torch.Tensor:
    step = max(1, vocab_size // (PROBE_LENGTH + 3))
    return (torch.arange(1, PROBE_LENGTH + 1) * step % max(vocab_size, 1)).unsqueeze(0)


@torch.no_grad()
def residual_scale(model: nn.Module) -> float | None:
    """The largest per-layer median residual-stream norm of ``model`` in model units (see the module
    docstring), or ``None`` when it cannot be measured (the model's forward fails on the probe)."""
    if model in _SCALES:
        return _SCALES[model]
    adapter = get_adapter(model)
    norms: list[float] = []

    def record(module, args, output) -> None:
        hidden = first_tensor(output)
        norms.append(float(hidden[0, 1:].float().norm(dim=-1).median()))

    vocab = int(getattr(model.config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings)
    handles = [adapter.block(layer).register_forward_hook(record) for layer in range(adapter.n_layers)]
    device = next(model.parameters()).device
    try:
        model(input_ids=_probe_ids(vocab).to(device), use_cache=False)
        scale = max(norms) if norms and all(n == n for n in norms) else None
    except Exception:  # an unusual model: the callers then fall back to the absolute limit only
        scale = None
    finally:
        for handle in handles:
            handle.remove()
    _SCALES[model] = scale
    return scale


__all__ = ["PROBE_LENGTH", "residual_scale"]
