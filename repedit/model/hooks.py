"""Registering hooks at named sites, with guaranteed removal.

A *site function* receives the hidden states at a site, ``[batch, seq, d_model]``, and returns either
``None`` (read only) or a tensor of the same shape that replaces them downstream. Hooks are removed
when the context exits, also when the forward pass raises.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from .arch import ModelAdapter, first_tensor
from .sites import Site

SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def _replace_first(output: object, new: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:]) if isinstance(output, tuple) else [new, *output[1:]]


def register_site_hook(adapter: ModelAdapter, site: Site, fn: SiteFn) -> RemovableHandle:
    """Register ``fn`` at ``site`` and return the handle (call ``handle.remove()`` to undo)."""
    if site.kind == "resid_pre":
        block = adapter.block(site.layer)

        def pre_hook(module, args, kwargs):
            if args:
                result = fn(args[0])
                return None if result is None else ((result, *args[1:]), kwargs)
            result = fn(kwargs["hidden_states"])
            return None if result is None else (args, {**kwargs, "hidden_states": result})

        return block.register_forward_pre_hook(pre_hook, with_kwargs=True)

    module = {
        "resid_post": adapter.block,
        "attn_out": adapter.attn_out_module,
        "mlp_out": adapter.mlp_out_module,
    }[site.kind](site.layer)

    def hook(module, args, output):
        result = fn(first_tensor(output))
        return None if result is None else _replace_first(output, result)

    return module.register_forward_hook(hook)


@contextlib.contextmanager
def site_hooks(adapter: ModelAdapter, fns: Mapping[Site, SiteFn]) -> Iterator[list[RemovableHandle]]:
    """Context manager registering ``fns`` (site -> function); every hook is removed on exit."""
    handles: list[RemovableHandle] = []
    try:
        for site, fn in fns.items():
            handles.append(register_site_hook(adapter, site, fn))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a hook after the deepest block a reader needs: the rest of the model is not run."""


def read_sites(adapter: ModelAdapter, sites: "Sequence[Site]", read: Callable[[Site, torch.Tensor], None], **decoder_inputs) -> None:
    """Run the decoder on ``decoder_inputs`` (``input_ids``, ``attention_mask``, ``position_ids``)
    and call ``read(site, hidden)`` with the hidden states ``[batch, seq, d_model]`` at each site.

    The forward stops after the deepest requested block (:class:`StopForward`), so reading layer 3
    of a 30-layer model costs 4 blocks; no logits are computed. Hooks are removed on every exit."""
    def stop(module, args, output):
        raise StopForward

    with site_hooks(adapter, {site: (lambda hidden, site=site: read(site, hidden)) for site in sites}):
        handle = adapter.block(max(site.layer for site in sites)).register_forward_hook(stop)
        try:
            adapter.decoder(**decoder_inputs, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
