"""Architecture adapters: where the decoder blocks, attention, MLP and norms of a model live.

One small table maps each supported ``model_type`` to attribute names. A model whose type is not in
the table is still accepted when one of the known layouts matches its modules exactly; otherwise
:class:`UnsupportedModelError` names the model type and every attribute path that was looked for.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's layout is not one repedit knows; the message lists what was looked for."""


@dataclass(frozen=True)
class Layout:
    """Attribute names of one family of decoder-only transformers.

    ``attn_out``/``mlp_out`` name the block child whose *output* is exactly what the attention/MLP
    sub-layer adds to the residual stream (for Gemma 2/3 that is the post-norm, not the raw
    attention output); ``None`` means the attention/MLP module itself.
    """

    blocks: str
    attn: str
    mlp: str
    input_norm: str
    pre_mlp_norm: str
    final_norm: str
    embed: str
    attn_out: str | None = None
    mlp_out: str | None = None


_LLAMA = Layout("layers", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens")
_GEMMA2 = Layout(
    "layers", "self_attn", "mlp", "input_layernorm", "pre_feedforward_layernorm", "norm", "embed_tokens",
    attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
)
_GPT2 = Layout("h", "attn", "mlp", "ln_1", "ln_2", "ln_f", "wte")
# GPT-NeoX wraps each sub-layer output in a dropout module (identity in eval) right before the add.
_GPT_NEOX = Layout(
    "layers", "attention", "mlp", "input_layernorm", "post_attention_layernorm", "final_layer_norm", "embed_in",
    attn_out="post_attention_dropout", mlp_out="post_mlp_dropout",
)

LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,
    "gemma": _LLAMA,
    "olmo": _LLAMA,
    "smollm3": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
}


def _child(module: nn.Module, name: str) -> nn.Module | None:
    return getattr(module, name, None) if isinstance(getattr(module, name, None), nn.Module) else None


def _find_decoder(model: nn.Module, layout: Layout) -> nn.Module | None:
    """Return the module holding ``layout.blocks`` (e.g. ``LlamaModel``) inside a CausalLM wrapper."""
    candidates = [model, getattr(model, "base_model", None), getattr(model, "model", None), getattr(model, "transformer", None)]
    inner = getattr(model, "model", None)
    if inner is not None:
        candidates.append(getattr(inner, "language_model", None))  # multimodal wrappers (e.g. Gemma 3)
    for candidate in candidates:
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, layout.blocks, None), nn.ModuleList):
            return candidate
    return None


def _layout_matches(model: nn.Module, layout: Layout) -> bool:
    decoder = _find_decoder(model, layout)
    if decoder is None or _child(decoder, layout.final_norm) is None or _child(decoder, layout.embed) is None:
        return False
    block = getattr(decoder, layout.blocks)[0]
    names = [layout.attn, layout.mlp, layout.input_norm, layout.pre_mlp_norm, layout.attn_out, layout.mlp_out]
    return all(_child(block, name) is not None for name in names if name is not None)


def _n_required(layout: Layout) -> int:
    """How many block children a layout requires (more = more specific)."""
    return sum(name is not None for name in (layout.attn, layout.mlp, layout.input_norm, layout.pre_mlp_norm, layout.attn_out, layout.mlp_out))


@dataclass(frozen=True)
class ModelAdapter:
    """Uniform access to the parts of a decoder-only model that repedit hooks.

    ``decoder`` is the stack without the LM head (e.g. ``LlamaModel``); ``module_prefix`` is its
    dotted name inside ``model`` (``"model"``, ``"transformer"``, or ``""``).
    """

    model: nn.Module
    model_type: str
    layout: Layout
    decoder: nn.Module
    module_prefix: str

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.decoder, self.layout.blocks)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.embed.weight.shape[1])

    @property
    def embed(self) -> nn.Module:
        return getattr(self.decoder, self.layout.embed)

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self.decoder, self.layout.final_norm)

    @property
    def unembed(self) -> nn.Module | None:
        """The LM head (``lm_head``), or ``None`` for a bare decoder."""
        getter = getattr(self.model, "get_output_embeddings", None)
        return getter() if callable(getter) else None

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def attn(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.layout.attn)

    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.layout.mlp)

    def input_norm(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.layout.input_norm)

    def pre_mlp_norm(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.layout.pre_mlp_norm)

    def attn_out_module(self, layer: int) -> nn.Module:
        """The module whose output is what attention adds to the residual stream at ``layer``."""
        return getattr(self.blocks[layer], self.layout.attn_out or self.layout.attn)

    def mlp_out_module(self, layer: int) -> nn.Module:
        """The module whose output is what the MLP adds to the residual stream at ``layer``."""
        return getattr(self.blocks[layer], self.layout.mlp_out or self.layout.mlp)

    def module_path(self, kind: str, layer: int) -> str:
        """Dotted module name inside ``model`` for a block (``kind="block"``) or a sub-layer output."""
        child = {
            "block": None,
            "attn_out": self.layout.attn_out or self.layout.attn,
            "mlp_out": self.layout.mlp_out or self.layout.mlp,
        }[kind]
        parts = [p for p in (self.module_prefix, self.layout.blocks, str(layer), child) if p]
        return ".".join(parts)


# model -> (model_type, layout, decoder path): no reference back to the model, so a cached model can still be freed.
_LAYOUT_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[str, Layout, str]]" = weakref.WeakKeyDictionary()


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Return the :class:`ModelAdapter` for a Hugging Face decoder-only model.

    Cached per model object (finding the layout walks every module name); the cached adapter is reused only
    while the model type is unchanged and the decoder still sits at the same path. Raises
    :class:`UnsupportedModelError` naming the model type and the attribute paths looked for.
    """
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", type(model).__name__))
    cached = _LAYOUT_CACHE.get(model)
    if cached is not None and cached[0] == model_type:
        decoder = _submodule(model, cached[2])
        if decoder is not None and _layout_matches(model, cached[1]):
            return ModelAdapter(model, model_type, cached[1], decoder, cached[2])
    adapter = _find_adapter(model, model_type)
    _LAYOUT_CACHE[model] = (model_type, adapter.layout, adapter.module_prefix)
    return adapter


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _find_adapter(model: nn.Module, model_type: str) -> ModelAdapter:
    known = LAYOUTS.get(model_type)
    # For an unknown type, try the most specific layouts first: a Gemma 2-like block also has every
    # module of the Llama layout, and matching it as Llama would hook the wrong attn_out/mlp_out.
    tried = [known] if known is not None else sorted(dict.fromkeys(LAYOUTS.values()), key=_n_required, reverse=True)
    for layout in tried:
        if _layout_matches(model, layout):
            decoder = _find_decoder(model, layout)
            prefix = next((name for name, module in model.named_modules() if module is decoder), "")
            return ModelAdapter(model, model_type, layout, decoder, prefix)
    looked_for = "; ".join(
        f"<decoder>.{lo.blocks}[i].{{{', '.join(n for n in (lo.attn, lo.mlp, lo.input_norm, lo.pre_mlp_norm, lo.attn_out, lo.mlp_out) if n)}}}"
        f" with <decoder>.{lo.final_norm} and <decoder>.{lo.embed}"
        for lo in dict.fromkeys(tried)
    )
    supported = ", ".join(sorted(LAYOUTS))
    raise UnsupportedModelError(
        f"unsupported model {type(model).__name__} (model_type={model_type!r}): looked for {looked_for}, "
        f"where <decoder> is the model itself, .base_model, .model, .transformer or .model.language_model. "
        f"Supported model types: {supported}."
    )


def first_tensor(output: object) -> torch.Tensor:
    """The hidden-state tensor of a module output (a tensor, or the first element of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"expected a tensor or a tuple starting with a tensor, got {type(output).__name__}")
