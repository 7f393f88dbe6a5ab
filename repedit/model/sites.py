"""Stable, human names for places in the residual stream, TransformerLens style.

=================  ==============================================================  =====================
site               meaning (``L`` is the 0-based block index)                      Hugging Face / others
=================  ==============================================================  =====================
``resid_pre.L``    input of block ``L`` (the residual stream before it)            ``hidden_states[L]``
``resid_post.L``   output of block ``L`` (the residual stream after it)            ``hidden_states[L+1]`` (*)
``attn_out.L``     what the attention sub-layer of block ``L`` adds to the stream  TL ``hook_attn_out``
``mlp_out.L``      what the MLP sub-layer of block ``L`` adds to the stream        TL ``hook_mlp_out``
=================  ==============================================================  =====================

Conventions (tested in ``tests/test_capture.py``):

* ``resid_post.L`` == HF ``output_hidden_states[L+1]`` == TL ``blocks.L.hook_resid_post`` == the place
  where llama.cpp adds control vector ``direction.L``. (*) For the *last* block HF replaces
  ``hidden_states[-1]`` by the final-norm output; ``resid_post.{n-1}`` is the raw block output.
* ``resid_post.L`` == ``resid_pre.{L+1}``, and for every supported architecture (sequential or
  parallel residual) ``resid_post.L == resid_pre.L + attn_out.L + mlp_out.L``.

TransformerLens names (``blocks.6.hook_resid_post``) and negative layers (``resid_post.-1``) are
accepted by :func:`parse_site` and normalised to the canonical form.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..io import InputError

SITE_KINDS: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")

_TL_PATTERN = re.compile(r"blocks\.(-?\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)")
_PATTERN = re.compile(r"([a-z_]+)\.(-?\d+)")


@dataclass(frozen=True, order=True)
class Site:
    """One hook site: a kind from :data:`SITE_KINDS` and a 0-based layer."""

    kind: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def tl_name(self) -> str:
        """The TransformerLens hook name of this site."""
        return f"blocks.{self.layer}.hook_{self.kind}"

    def __str__(self) -> str:
        return self.name


def site_layer(name: str) -> int:
    """The layer of a canonical site name (``"resid_post.12"`` -> 12), for names that were already parsed
    against a model (stored edits, selections, probe results); raises :class:`~repedit.io.InputError` otherwise."""
    match = _PATTERN.fullmatch(str(name))
    if not match or match.group(1) not in SITE_KINDS or match.group(2).startswith("-"):
        raise InputError(f"{name!r} is not a canonical site name '<kind>.<layer>' (kind one of {', '.join(SITE_KINDS)})")
    return int(match.group(2))


@functools.lru_cache(maxsize=4096)  # sites are parsed on every hook registration; Site is frozen, so sharing is safe
def parse_site(name: str | Site, n_layers: int) -> Site:
    """Parse ``"resid_post.6"`` (or ``"blocks.6.hook_resid_post"``, or ``"resid_post.-1"``) into a :class:`Site`.

    Raises :class:`~repedit.io.InputError` for an unknown kind (listing the valid ones) or a layer out
    of range (giving the range).
    """
    if isinstance(name, Site):
        kind, layer = name.kind, name.layer
    else:
        text = str(name).strip()
        match = _TL_PATTERN.fullmatch(text)
        if match:
            layer, kind = int(match.group(1)), match.group(2)
        else:
            match = _PATTERN.fullmatch(text)
            if not match:
                raise InputError(
                    f"unknown site {text!r}: expected '<kind>.<layer>' with kind one of {', '.join(SITE_KINDS)} "
                    f"and layer in 0..{n_layers - 1} (e.g. 'resid_post.{n_layers // 2}')"
                )
            kind, layer = match.group(1), int(match.group(2))
    if kind not in SITE_KINDS:
        raise InputError(f"unknown site kind {kind!r} in {str(name)!r}: valid kinds are {', '.join(SITE_KINDS)}")
    if not -n_layers <= layer < n_layers:
        raise InputError(
            f"layer {layer} of site {str(name)!r} is out of range: this model has {n_layers} layers, "
            f"valid layers are 0..{n_layers - 1} (or -{n_layers}..-1 from the end)"
        )
    return Site(kind, layer % n_layers)


def parse_sites(names: str | Site | Iterable[str | Site] | None, n_layers: int) -> list[Site]:
    """Parse a list of site names; a bare kind (``"resid_post"``) expands to every layer.

    ``None`` means every ``resid_post`` site. Duplicates are dropped, order is kept. An empty list is
    an error.
    """
    if names is None:
        names = ["resid_post"]
    if isinstance(names, (str, Site)):
        names = [names]
    sites: list[Site] = []
    for name in names:
        if isinstance(name, str) and name.strip() in SITE_KINDS:
            sites.extend(Site(name.strip(), layer) for layer in range(n_layers))
        else:
            sites.append(parse_site(name, n_layers))
    if not sites:
        raise InputError("no sites given: pass at least one site such as 'resid_post.6', or a kind such as 'resid_post'")
    return list(dict.fromkeys(sites))


def site_names(sites: Sequence[Site]) -> list[str]:
    return [site.name for site in sites]
