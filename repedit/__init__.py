"""repedit: representation editing and interpretability for personalising LLMs per user.

Data flows one way: pairs -> capture -> probes -> steering -> export/serve.
"""

from .capture.activations import Activations, capture
from .io import InputError
from .model.arch import ModelAdapter, UnsupportedModelError, get_adapter
from .model.loading import DEFAULT_MODEL, cache_dir, load_model, load_tokenizer, model_fingerprint
from .model.sites import SITE_KINDS, Site, parse_site, parse_sites

__all__ = [
    "Activations", "DEFAULT_MODEL", "InputError", "ModelAdapter", "SITE_KINDS", "Site", "UnsupportedModelError",
    "cache_dir", "capture", "get_adapter", "load_model", "load_tokenizer", "model_fingerprint", "parse_site", "parse_sites",
]
__version__ = "0.1.0"
