"""Reading hidden states through other interpretability libraries: TransformerLens and nnsight.

:func:`repedit.capture` reads activations with its own forward hooks by default (``backend="torch"``).
The backends here read the *same* sites through TransformerLens (``backend="transformer_lens"``) or
nnsight (``backend="nnsight"``), so results can be cross-checked against, or shared with, code
written for those libraries. Every backend implements :class:`repedit.capture.activations.Backend`:
``run(input_ids, attention_mask, position_ids, sites)`` returns the full hidden states
``[batch, seq, d_model]`` of every site, and :func:`~repedit.capture.activations.capture` reduces them (last
token, mean, all tokens) exactly as it does for the native path.

Build a backend once and pass the object as ``capture(..., backend=obj)`` to reuse it across calls;
a backend *name* builds a fresh one per call (for TransformerLens that copies the model each time).
A backend reflects the weights of the model at the time it was built.

Site mapping (the definitions of :mod:`repedit.model.sites`):

=================  ===============================  ==========================================================
site               TransformerLens hook             nnsight (module path from ``ModelAdapter.module_path``)
=================  ===============================  ==========================================================
``resid_pre.L``    ``blocks.L.hook_resid_pre``      first input (``hidden_states``) of block ``L``
``resid_post.L``   ``blocks.L.hook_resid_post``     output of block ``L``
``attn_out.L``     ``blocks.L.hook_attn_out``       output of ``adapter.attn_out_module(L)`` (first element)
``mlp_out.L``      ``blocks.L.hook_mlp_out``        output of ``adapter.mlp_out_module(L)`` (first element)
=================  ===============================  ==========================================================

Padding: both backends pass ``attention_mask`` *and* ``position_ids`` to the model, so a left- or
right-padded row gives the same hidden states as the row alone (tested in ``tests/test_backends.py``
against the native backend and against single-row runs).

Limits and quirks (TransformerLens 4.3, nnsight 0.8.1, transformers 5.24, measured on CPU):

* **TransformerLens** (:class:`TransformerLensBackend`) builds a ``TransformerBridge`` with
  ``TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)``, which never touches the
  Hugging Face hub when given a loaded model. The bridge rewires the model it is given *in place*
  (its blocks become bridge components) and switches its attention to ``"eager"``, so the backend
  works on a ``copy.deepcopy`` of the model (twice the weight memory while it lives) and never
  mutates the caller's model. Because of the eager switch, results match the native backend to
  float rounding only when the caller's model also uses eager attention (measured: bit-identical on
  SmolLM2-135M and on tiny llama/mistral/qwen2/gemma/gemma2/gemma3/gpt_neox/phi3 models, 1e-6 on tiny
  GPT-2); against ``"sdpa"`` they differ by float reordering (SmolLM2-135M: up to 6e-5 absolute at
  layer 20, 2e-6 relative per token; up to ~2e-4 has been seen on other inputs). Only architectures
  TransformerLens has an adapter for can be bridged; the error names the architecture otherwise.
  TransformerLens picks its adapter by ``config.architectures``, which a model built from a config
  in memory lacks: the backend fills it in with the model's class name on its copy.
* **nnsight** (:class:`NNsightBackend`) wraps the model with ``nnsight.TransformersModel`` (the
  non-deprecated successor of ``LanguageModel``; ``LanguageModel`` is used on older nnsight). The
  wrapper is given a deep copy of the tokenizer because wrapping sets ``padding_side="left"`` on it.
  nnsight instruments modules by installing a pass-through ``forward`` attribute on every module of
  the model it wraps; outside a trace the model computes exactly what it did before, but the module
  objects do change. Pass ``copy_model=True`` to wrap a private copy instead. Module outputs must be
  read in execution order, so sites are read per block as input, attention, MLP, output, and the
  forward pass stops after the deepest requested block.
* Both libraries derive ``position_ids`` from the mask when none are given (nnsight only for a
  left-padding tokenizer), and transformers 5 infers *packed sequences* from ``position_ids`` that
  restart when no mask is passed, so a dropped mask or dropped positions can go unnoticed with
  ordinary padded batches; the tests check both with inputs where they matter.
* Both backends need a causal-LM model (with its LM head, e.g. ``LlamaForCausalLM``), not a bare
  decoder stack.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any, Sequence

import torch
from torch import nn

from ..io import InputError
from ..model.arch import ModelAdapter, first_tensor, get_adapter
from ..model.hooks import read_sites
from ..model.sites import Site

BACKENDS: tuple[str, ...] = ("torch", "transformer_lens", "nnsight")
_ALIASES: dict[str, str] = {"tl": "transformer_lens", "transformerlens": "transformer_lens", "transformer-lens": "transformer_lens"}

# Order in which the sites of one block are computed: needed by nnsight, which reads module
# inputs/outputs in execution order.
_STAGE: dict[str, int] = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


def _import_optional(module: str, package: str, extra: str, backend: str) -> Any:
    """Import ``module`` or raise an :class:`ImportError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"backend {backend!r} needs the package {package!r}, which is not installed: "
            f"install it with `pip install 'repedit[{extra}]'` (or `pip install {package}`)"
        ) from err


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, sites: Sequence[Site]) -> None:
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    for name, tensor in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if tuple(tensor.shape) != tuple(input_ids.shape):
            raise InputError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(tensor.shape)}")
    if not sites:
        raise InputError("no sites given: pass at least one Site such as Site('resid_post', 0)")


def _check_shape(site: Site, value: torch.Tensor, input_ids: torch.Tensor, d_model: int, backend: str) -> torch.Tensor:
    expected = (*input_ids.shape, d_model)
    if tuple(value.shape) != expected:
        raise RuntimeError(
            f"backend {backend!r} returned shape {tuple(value.shape)} at site {site.name}; expected {expected}"
        )
    return value.detach()


class TorchBackend:
    """The native backend as a :class:`~repedit.capture.activations.Backend` object: forward hooks on the model itself.

    :func:`repedit.capture` does not need it (``backend="torch"`` uses a faster path that reduces
    inside the hooks); it exists as a reference implementation returning full hidden states.
    """

    name = "torch"

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.adapter: ModelAdapter = get_adapter(model)

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, sites: Sequence[Site]
    ) -> dict[Site, torch.Tensor]:
        """Full hidden states ``[batch, seq, d_model]`` at every site (one forward, stopped after the deepest block)."""
        _check_inputs(input_ids, attention_mask, position_ids, sites)
        results: dict[Site, torch.Tensor] = {}

        def read(site: Site, hidden: torch.Tensor) -> None:
            results[site] = hidden.detach()

        with torch.no_grad():
            read_sites(self.adapter, sites, read, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return {site: _check_shape(site, results[site], input_ids, self.adapter.d_model, self.name) for site in sites}


class TransformerLensBackend:
    """Hidden states read with TransformerLens ``run_with_cache`` on a ``TransformerBridge``.

    The bridge is built on a deep copy of ``model`` (the bridge rewires the model it is given), on
    the model's device and dtype, with a copy of ``tokenizer``. Works offline.
    """

    name = "transformer_lens"

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        _import_optional("transformer_lens", "transformer-lens", "tl", self.name)
        from transformer_lens.model_bridge import TransformerBridge

        self.adapter: ModelAdapter = get_adapter(model)
        self.n_layers = self.adapter.n_layers
        self.d_model = self.adapter.d_model
        parameter = next(model.parameters())
        private = copy.deepcopy(model)
        private.eval()
        if not getattr(private.config, "architectures", None):
            # Models built from a config (not from_pretrained) carry no architecture name, and
            # TransformerLens picks its adapter by that name.
            private.config.architectures = [type(private).__name__]
        name = str(getattr(model.config, "_name_or_path", "") or getattr(model.config, "model_type", "model"))
        try:
            self.bridge = TransformerBridge.boot_transformers(
                name,
                hf_model=private,
                tokenizer=copy.deepcopy(tokenizer),
                device=parameter.device,
                dtype=parameter.dtype,
            )
        except Exception as err:
            detail = str(err) if len(str(err)) <= 400 else str(err)[:400] + "..."
            raise InputError(
                f"TransformerLens cannot bridge this model ({type(model).__name__}, "
                f"model_type={self.adapter.model_type!r}): {type(err).__name__}: {detail} "
                "Use backend='torch' or backend='nnsight' for it."
            ) from err
        self.bridge.eval()
        missing = [
            f"blocks.{layer}.hook_{kind}" for layer in (0, self.n_layers - 1) for kind in _STAGE
            if f"blocks.{layer}.hook_{kind}" not in self.bridge.hook_dict
        ]
        if missing:
            raise InputError(
                f"the TransformerLens bridge of {type(model).__name__} (model_type={self.adapter.model_type!r}) "
                f"has no hook point(s) {', '.join(missing)}; use backend='torch' or backend='nnsight'"
            )

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, sites: Sequence[Site]
    ) -> dict[Site, torch.Tensor]:
        """Full hidden states ``[batch, seq, d_model]`` at every site, from one ``run_with_cache`` call.

        Only the requested hook points are cached, and the forward pass stops after the deepest
        requested block (``stop_at_layer``) when that is not the last one.
        """
        _check_inputs(input_ids, attention_mask, position_ids, sites)
        names = list(dict.fromkeys(site.tl_name for site in sites))
        deepest = max(site.layer for site in sites)
        kwargs: dict[str, Any] = {}
        if deepest + 1 < self.n_layers:
            kwargs["stop_at_layer"] = deepest + 1
        with torch.no_grad():
            _, cache = self.bridge.run_with_cache(
                input_ids,
                names_filter=names,
                return_cache_object=False,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **kwargs,
            )
        missing = [name for name in names if name not in cache]
        if missing:
            raise RuntimeError(f"TransformerLens did not record hook point(s) {', '.join(missing)}")
        return {site: _check_shape(site, cache[site.tl_name], input_ids, self.d_model, self.name) for site in sites}


class NNsightBackend:
    """Hidden states read inside an nnsight trace at the modules named by :meth:`ModelAdapter.module_path`.

    ``model`` is wrapped with ``nnsight.TransformersModel`` (``LanguageModel`` on nnsight versions
    without it), given a deep copy of ``tokenizer``. With ``copy_model=True`` a private copy of the
    model is wrapped, leaving the caller's module objects untouched (see the module docstring).
    """

    name = "nnsight"

    def __init__(self, model: nn.Module, tokenizer: Any, *, copy_model: bool = False) -> None:
        nnsight = _import_optional("nnsight", "nnsight", "nnsight", self.name)
        target = copy.deepcopy(model).eval() if copy_model else model
        self.adapter: ModelAdapter = get_adapter(target)
        self.d_model = self.adapter.d_model
        wrapper = getattr(nnsight, "TransformersModel", None) or nnsight.LanguageModel
        try:
            self.lm = wrapper(target, tokenizer=copy.deepcopy(tokenizer))
        except Exception as err:
            raise InputError(
                f"nnsight cannot wrap this model ({type(model).__name__}, model_type={self.adapter.model_type!r}): "
                f"{type(err).__name__}: {err}. Use backend='torch' for it."
            ) from err
        self._nnsight = nnsight

    def _envoy(self, path: str) -> Any:
        envoy = self.lm
        for part in path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, sites: Sequence[Site]
    ) -> dict[Site, torch.Tensor]:
        """Full hidden states ``[batch, seq, d_model]`` at every site, from one traced forward pass."""
        _check_inputs(input_ids, attention_mask, position_ids, sites)
        ordered = sorted(dict.fromkeys(sites), key=lambda s: (s.layer, _STAGE[s.kind]))
        plan = [
            (site, self.adapter.module_path("block" if site.kind in ("resid_pre", "resid_post") else site.kind, site.layer))
            for site in ordered
        ]
        save = self._nnsight.save
        results: dict[Site, torch.Tensor] = {}
        with torch.no_grad():
            with self.lm.trace(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False) as tracer:
                for site, path in plan:
                    envoy = self._envoy(path)
                    if site.kind == "resid_pre":
                        args, kwargs = envoy.inputs
                        value = args[0] if args else kwargs["hidden_states"]
                    else:
                        value = first_tensor(envoy.output)
                    results[site] = save(value)
                tracer.stop()
        return {site: _check_shape(site, results[site], input_ids, self.d_model, self.name) for site in sites}


def make_backend(name: str, model: nn.Module, tokenizer: Any) -> "TorchBackend | TransformerLensBackend | NNsightBackend":
    """Build the backend called ``name`` (``"torch"``, ``"transformer_lens"`` or ``"nnsight"``) for ``model``.

    Raises :class:`~repedit.io.InputError` for an unknown name (listing the valid ones) and
    :class:`ImportError` naming the extra to install when the library is missing.
    """
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key == "torch":
        return TorchBackend(model, tokenizer)
    if key == "transformer_lens":
        return TransformerLensBackend(model, tokenizer)
    if key == "nnsight":
        return NNsightBackend(model, tokenizer)
    raise InputError(f"unknown backend {name!r}: valid backends are {', '.join(BACKENDS)} (or a Backend object)")
