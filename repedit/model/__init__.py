"""The model stage: architecture adapters, named sites, hooks, loading, tokenised inputs, generation.

Everything later stages need to read from or write into a Hugging Face causal LM. Imports nothing
of repedit but :mod:`repedit.io`.
"""

from .arch import LAYOUTS, ModelAdapter, UnsupportedModelError, first_tensor, get_adapter
from .generation import Generated, GenerationSettings, generate_batch, generate_chat, left_pad, render_chat
from .hooks import StopForward, read_sites, register_site_hook, site_hooks
from .inputs import Encoded, chunks, context_length, encode, read_inputs_jsonl
from .loading import CACHE_ENV, DEFAULT_MODEL, cache_dir, default_gguf_path, load_model, load_tokenizer, model_fingerprint
from .sites import SITE_KINDS, Site, parse_site, parse_sites, site_layer, site_names

__all__ = [
    "CACHE_ENV", "DEFAULT_MODEL", "Encoded", "Generated", "GenerationSettings", "LAYOUTS", "ModelAdapter", "SITE_KINDS", "Site",
    "StopForward", "UnsupportedModelError", "cache_dir", "chunks", "context_length", "default_gguf_path", "encode", "first_tensor",
    "generate_batch", "generate_chat", "get_adapter", "left_pad", "load_model", "load_tokenizer", "model_fingerprint", "parse_site", "parse_sites",
    "read_inputs_jsonl", "read_sites", "register_site_hook", "render_chat", "site_hooks", "site_layer", "site_names",
]
