"""Capture: hidden states at named sites (native hooks, TransformerLens or nnsight), and text embeddings.

``capture(model, tokenizer, inputs, sites)`` returns :class:`Activations` (saved as safetensors + JSON).
"""

from .activations import FORMAT_VERSION, POSITIONS, SPANS, Activations, Backend, capture
from .backends import BACKENDS, NNsightBackend, TorchBackend, TransformerLensBackend, make_backend
from .embedding import Embedder, default_embedder, minilm_available, minilm_embedder, model_embedder, text_representations

__all__ = [
    "BACKENDS", "FORMAT_VERSION", "POSITIONS", "SPANS", "Activations", "Backend", "Embedder", "NNsightBackend", "TorchBackend",
    "TransformerLensBackend", "capture", "default_embedder", "make_backend", "minilm_available", "minilm_embedder", "model_embedder",
    "text_representations",
]
