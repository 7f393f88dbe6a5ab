"""Trained per-user edits: steering parameters fitted by gradient descent, all users in one batch.

The model is frozen; only the edit's parameters learn. Per user and per chosen ``resid_post.L``:

* ``kind="vector"`` — an additive vector ``v`` (the ``add`` operator ``h + v``), initialised from
  the user's StyleVector mean difference (their real texts − the model's neutral answers);
* ``kind="lowrank"`` — the LoReFT-style ``lowrank`` operator ``h + Rᵀ(Wh + β − Rh)`` of rank ``k``
  (R orthonormal rows, kept orthonormal by a QR parametrisation), initialised to the same vector
  (R's first row along it, ``W = R``, ``β = Rv``), so that training starts where ``vector`` starts.

Objective, summed over users (each user's term depends only on that user's parameters, so the
users' trajectories are those of separate runs — an added user costs rows in the batch, not a run):

``NLL(user's real texts | their prompts)`` — mean over the response tokens of the user's
real-history pairs (prompt → what the user actually wrote);
``+ kl_weight · KL(unsteered ‖ steered)`` on neutral answers to neutral prompts (nats/token): keeps
the edit from moving the model where style should not matter;
``+ preference_weight · −log σ(β·[Δ(personalised) − Δ(neutral)])`` (BiPO-style, optional) on the
user's self-generated pairs, Δ = mean token log-probability steered − unsteered.

Positions: the edit is applied to **every** token (prompt and answer), as at inference with
``positions="all"``, so that training sees what serving does; the loss is taken on the answer tokens
only (the prompt is given, not written by the user).

Batching: every step takes one training item (and one neutral text, and one preference pair) per
user that is still training; row ``b`` of the batch is steered by its own user's parameters through
the per-row tables of :mod:`repedit.kernels` (row 0 = no edit) — the gather serving uses.
Early stopping: after each epoch the validation NLL of each user's own held-back items decides; a
user keeps the parameters of their best epoch (epoch 0 = the mean-difference initialisation) and
stops after ``patience`` epochs without improvement. Deterministic under ``seed`` (each user's item
order comes from the seed and the user id alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..io import InputError
from ..kernels import reference
from ..model.arch import get_adapter
from ..model.hooks import read_sites, register_site_hook
from ..model.inputs import encode
from ..model.loading import model_fingerprint
from ..model.sites import parse_site
from ..pairs.synthesis import REAL_HISTORY, SELF_GENERATED, Pair
from .edit import SiteEdit, UserEdit
from .fit import default_layers, fit_user_edits

TRAIN_KINDS: tuple[str, ...] = ("vector", "lowrank")


@dataclass(frozen=True)
class TrainSettings:
    """Settings of :func:`train_user_edits` (module docstring). Units: learning rates per Adam step;
    ``max_tokens`` per item (longer items keep their last tokens, where the answer is)."""

    kind: str = "vector"
    layers: tuple[int, ...] | None = None  # resid_post layers (default: repedit.steering.default_layers)
    rank: int = 4  # k of the lowrank kind
    epochs: int = 8
    lr: float = 0.05  # vector entries and β (model units)
    lr_matrix: float = 0.002  # R's free parameters and W − R (lowrank)
    kl_weight: float = 0.1
    preference_weight: float = 0.0
    preference_beta: float = 2.0
    init_strength: float = 1.0  # the mean-difference vector is scaled by this at epoch 0
    val_items: int = 2  # per user: the last real-history items, held back for early stopping
    patience: int = 2
    n_neutral: int = 8
    batch_size: int = 16  # most rows in one micro-batch
    # A micro-batch's padded tokens (rows × its longest row) stay within this multiple of its real
    # tokens: rows are sorted by length and a longer row starts a new micro-batch rather than pad
    # the others to its length (on a CPU, padding is paid in full). inf: fixed micro-batches of batch_size rows.
    max_padding: float = 1.25
    max_tokens: int = 256
    # The frozen blocks below the first trained site compute the same hidden states at every step: they
    # run once per item and are kept (fp32 or the model's dtype) if they fit in this many bytes; 0: off.
    prefix_cache_bytes: int = 2 * 1024**3
    seed: int = 0
    # Steps of every epoch (each a row per active user); None: the most training items of any user
    # trained here. A scaled-out run sets that of *all* users, so a user's schedule — and edit — does
    # not depend on which users share its worker.
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in TRAIN_KINDS:
            raise InputError(f"unknown trained-edit kind {self.kind!r}: expected one of {', '.join(TRAIN_KINDS)}")
        if not self.max_padding >= 1.0 or self.batch_size < 1:
            raise InputError(f"max_padding must be ≥ 1 and batch_size ≥ 1 (got {self.max_padding}, {self.batch_size})")
        if self.rank < 1 or self.epochs < 0 or self.val_items < 1 or self.patience < 1:
            raise InputError(f"rank, val_items and patience must be ≥ 1 and epochs ≥ 0 (got rank {self.rank}, epochs {self.epochs}, "
                             f"val_items {self.val_items}, patience {self.patience})")


@dataclass
class TrainResult:
    """What training produced: the edits, and per user and epoch the numbers early stopping saw.

    ``history`` rows: ``{user_id, epoch, train_nll, train_kl, val_nll}`` (nats/token; epoch 0 = the
    initialisation); ``best[user]`` = ``{epoch, val_nll, init_val_nll, unsteered_val_nll, n_train, n_val}``.
    """

    edits: dict[str, UserEdit]
    history: list[dict[str, Any]]
    best: dict[str, dict[str, Any]]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """Everything but the edits, JSON-ready (``training.json``)."""
        return {"settings": self.settings, "best": self.best, "history": self.history, "seconds": self.seconds}


@dataclass(frozen=True)
class _Item:
    user: int  # index in the user list
    input_ids: list[int]
    lo: int  # answer tokens are input_ids[lo:hi]
    hi: int


def _user_generator(seed: int, user_id: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _encode_items(tokenizer, users: list[int], pairs: Sequence[tuple[str, str]], max_tokens: int) -> list[_Item]:
    if not pairs:
        return []
    encoded = encode(tokenizer, list(pairs), max_length=max_tokens)
    return [_Item(u, e.input_ids, max(e.response_span[0], 1), e.response_span[1]) for u, e in zip(users, encoded)]


def _orthonormal(free: torch.Tensor) -> torch.Tensor:
    """Rows of R ``[..., k, d]`` from free parameters ``[..., d, k]`` by QR (signs fixed: continuous)."""
    q, r = torch.linalg.qr(free)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs[..., None, :]).transpose(-1, -2)


class _Tables:
    """The trainable per-user parameters and the hooks that apply them, row by row."""

    def __init__(self, model, sites: list[str], init: torch.Tensor, settings: TrainSettings) -> None:
        # init: [n_users, n_sites, d] the mean-difference vectors (already scaled)
        self.adapter = get_adapter(model)
        self.sites = sites
        self.kind = settings.kind
        n_users, n_sites, d = init.shape
        device = next(model.parameters()).device  # the parameters live where the model runs (no copies per forward)
        init = init.to(device)
        self.row_index = torch.zeros(0, dtype=torch.long)
        if self.kind == "vector":
            self.vector = torch.nn.Parameter(init.clone())
            self.groups = [{"params": [self.vector], "lr": settings.lr}]
        else:
            k = min(settings.rank, d)
            gen = torch.Generator().manual_seed(settings.seed)
            free = torch.randn(n_users, n_sites, d, k, generator=gen).to(device)  # drawn on the CPU: the same draw on any device
            norms = init.norm(dim=-1, keepdim=True)
            unit = torch.where(norms > 0, init / norms.clamp_min(1e-12), free[..., 0])
            free[..., 0] = unit * math.sqrt(d)  # R's first row along the mean difference
            self.free = torch.nn.Parameter(free)
            basis = _orthonormal(free)
            self.weight_delta = torch.nn.Parameter(torch.zeros(n_users, n_sites, k, d, device=device))  # W = R + ΔW
            self.bias = torch.nn.Parameter(torch.einsum("usd,uskd->usk", init, basis).detach().clone())
            self.groups = [{"params": [self.free, self.weight_delta], "lr": settings.lr_matrix}, {"params": [self.bias], "lr": settings.lr}]

    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.groups for p in group["params"]]

    def user_rows(self, users: Sequence[int]) -> list[torch.Tensor]:
        """Per parameter, the rows of ``users`` (a snapshot for early stopping)."""
        index = torch.tensor(list(users), dtype=torch.long)
        return [p.detach()[index].clone() for p in self.parameters()]

    def restore(self, users: Sequence[int], rows: list[torch.Tensor]) -> None:
        index = torch.tensor(list(users), dtype=torch.long)
        with torch.no_grad():
            for p, saved in zip(self.parameters(), rows):
                p[index] = saved

    def _site_fn(self, s: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            idx = self.row_index.to(h.device)
            if self.kind == "vector":
                table = torch.cat([torch.zeros_like(self.vector[:1, s]), self.vector[:, s]]).to(h.device)  # row 0 = no edit
                return reference.gather_add(h, idx, table)
            basis = _orthonormal(self.free[:, s])
            zero = torch.zeros_like(basis[:1])
            tables = [torch.cat([zero, basis]), torch.cat([zero, basis + self.weight_delta[:, s]]),
                      torch.cat([torch.zeros_like(self.bias[:1, s]), self.bias[:, s]])]
            strength = torch.ones(basis.shape[0] + 1, dtype=h.dtype, device=h.device)
            strength[0] = 0.0
            return reference.lowrank_edit(h, idx, *(t.to(h.device) for t in tables), strength)
        return fn

    def hooks(self) -> list:
        return [register_site_hook(self.adapter, parse_site(site, self.adapter.n_layers), self._site_fn(s)) for s, site in enumerate(self.sites)]

    def edits(self, user_ids: list[str], fingerprint: str, provenance: dict[str, dict[str, Any]], method: str) -> dict[str, UserEdit]:
        out: dict[str, UserEdit] = {}
        with torch.no_grad():  # edits on the CPU, as every other stage makes them
            for u, user in enumerate(user_ids):
                site_edits = []
                for s, site in enumerate(self.sites):
                    if self.kind == "vector":
                        site_edits.append(SiteEdit(site, "add", vector=self.vector[u, s].detach().cpu().clone(), a=1.0))
                    else:
                        basis = _orthonormal(self.free[u, s])
                        site_edits.append(SiteEdit(site, "lowrank", basis=basis.cpu().clone(), weight=(basis + self.weight_delta[u, s]).cpu().clone(),
                                                   bias=self.bias[u, s].detach().cpu().clone(), a=1.0))
                out[user] = UserEdit(user, site_edits, fingerprint, self.adapter.d_model, method=method, provenance=provenance[user])
        return out


class _FrozenPrefix:
    """The hidden states entering block ``start`` (the first trained site's block) for every item,
    computed once: the blocks below are frozen and come before every edit, so their output never
    changes. A forward then runs blocks ``start…`` only, on these states as ``inputs_embeds``.

    Used only where it is exact: :meth:`verify` compares it with the full forward on real items and
    turns it off otherwise (e.g. a model that scales ``inputs_embeds``)."""

    def __init__(self, model, start: int) -> None:
        self.model, self.adapter, self.start = model, get_adapter(model), start
        self.hidden: dict[int, torch.Tensor] = {}  # id(item) -> [n_tokens, d]
        self.active = False

    def fill(self, items: Sequence[_Item], settings: TrainSettings, pad_id: int) -> None:
        unique = list({id(it): it for it in items}.values())
        dtype = next(self.model.parameters()).dtype
        need = sum(len(it.input_ids) for it in unique) * self.adapter.d_model * torch.finfo(dtype).bits // 8
        if self.start < 1 or not unique or need > settings.prefix_cache_bytes:
            return
        site = parse_site(f"resid_post.{self.start - 1}", self.adapter.n_layers)
        for part in micro_batches([len(it.input_ids) for it in unique], settings.batch_size, settings.max_padding):
            batch = [unique[k] for k in part]
            input_ids, mask, width = _left_padded(batch, pad_id)
            device = next(self.model.parameters()).device
            got: dict[str, torch.Tensor] = {}
            read_sites(self.adapter, [site], lambda _, hidden: got.__setitem__("h", hidden.detach()), input_ids=input_ids.to(device),
                       attention_mask=mask.to(device), position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device))
            for row, item in enumerate(batch):
                self.hidden[id(item)] = got["h"][row, width - len(item.input_ids):].clone()
        self.active = True

    def covers(self, items: Sequence[_Item]) -> bool:
        return self.active and all(id(it) in self.hidden for it in items)

    def inputs(self, items: Sequence[_Item], width: int) -> torch.Tensor:
        first = self.hidden[id(items[0])]
        embeds = first.new_zeros(len(items), width, first.shape[-1])  # padding rows: masked out
        for row, item in enumerate(items):
            embeds[row, width - len(item.input_ids):] = self.hidden[id(item)]
        return embeds

    @contextlib.contextmanager
    def blocks_from_start(self) -> Iterator[None]:
        """The decoder's block list cut to ``blocks[start:]`` for the duration (the same modules, so
        the edit's hooks on them still fire)."""
        name = self.adapter.layout.blocks
        full = getattr(self.adapter.decoder, name)
        setattr(self.adapter.decoder, name, torch.nn.ModuleList(list(full)[self.start:]))
        try:
            yield
        finally:
            setattr(self.adapter.decoder, name, full)

    def verify(self, items: Sequence[_Item], pad_id: int, tolerance: float = 1e-4) -> float | None:
        """Largest |Δ log-prob| between the cut and the full forward on ``items`` (None when not in use);
        the cut is turned off if that is above ``tolerance``."""
        if not self.active:
            return None
        with torch.no_grad():
            self.active = False
            full = _forward_logprobs(self.model, items, pad_id)
            self.active = True
            cut = _forward_logprobs(self.model, items, pad_id, self)
        gap = max(float((a - b).abs().max()) for a, b in zip(full, cut))
        if not gap <= tolerance:
            self.active, self.hidden = False, {}
        return gap


def _left_padded(items: Sequence[_Item], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    width = max(len(i.input_ids) for i in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, width - len(item.input_ids):] = torch.tensor(item.input_ids)
        mask[row, width - len(item.input_ids):] = 1
    return input_ids, mask, width


def _forward_logprobs(model, items: Sequence[_Item], pad_id: int, prefix: _FrozenPrefix | None = None) -> list[torch.Tensor]:
    """Per item, log-probabilities ``[n_answer_tokens, vocab]`` predicting its answer tokens (left
    padding, so every answer ends the row and only the last positions need logits). With a
    ``prefix`` that holds these items, only the blocks from its start run."""
    input_ids, mask, width = _left_padded(items, pad_id)
    keep = max(len(i.input_ids) - i.lo for i in items) + 1
    device = next(model.parameters()).device
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    if prefix is not None and prefix.covers(items):
        with prefix.blocks_from_start():
            logits = model(inputs_embeds=prefix.inputs(items, width), attention_mask=mask.to(device), position_ids=position_ids,
                           use_cache=False, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=position_ids,
                       use_cache=False, logits_to_keep=keep).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for row, item in enumerate(items):
        n = len(item.input_ids)
        # logits index j ↔ sequence position width-keep+j; token t is predicted at position t-1.
        start = (width - n + item.lo - 1) - (width - keep)
        stop = (width - n + item.hi - 1) - (width - keep)
        out.append(logprobs[row, start:stop])
    return out


def _token_logprob(logprobs: torch.Tensor, item: _Item) -> torch.Tensor:
    targets = torch.tensor(item.input_ids[item.lo:item.hi], device=logprobs.device)
    return logprobs.gather(-1, targets[:, None]).squeeze(-1).mean()


def _split_users(pairs: Sequence[Pair], val_items: int) -> tuple[list[str], dict[str, list[Pair]], dict[str, list[Pair]]]:
    real: dict[str, list[Pair]] = {}
    for pair in pairs:
        if pair.source == REAL_HISTORY:
            real.setdefault(pair.user_id, []).append(pair)
    if not real:
        raise InputError(f"trained edits learn from real-history pairs (the user's own texts); got sources {sorted({p.source for p in pairs})}")
    too_few = {u: len(p) for u, p in real.items() if len(p) < val_items + 2}
    if too_few:
        raise InputError(f"users with too few real-history items to train and validate (need {val_items + 2}: at least 2 to train, "
                         f"{val_items} to validate): " + ", ".join(f"{u!r} has {n}" for u, n in too_few.items()))
    users = list(real)
    return users, {u: real[u][:-val_items] for u in users}, {u: real[u][-val_items:] for u in users}


def train_user_edits(
    model, tokenizer, pairs: Sequence[Pair], *, settings: TrainSettings = TrainSettings(),
    neutral: Sequence[tuple[str, str]] | None = None, progress: bool = True,
) -> TrainResult:
    """Train one edit per user (module docstring) from ``pairs`` and return them with the training record.

    Args:
        pairs: real-history pairs (prompt → the user's own text, with the model's neutral answer) give
            the training and validation items (each user's last ``settings.val_items`` validate);
            self-generated pairs feed the optional preference term.
        neutral: ``(prompt, response)`` neutral texts for the KL term (default: the neutral answers of
            the first ``settings.n_neutral`` distinct prompts of the self-generated pairs, else of any pairs).

    Raises:
        InputError: a user with too few items (the message names users and counts), or a non-finite
            loss during training (names the user; nothing is returned, so nothing is written).
    """
    started = time.perf_counter()
    adapter = get_adapter(model)
    layers = list(settings.layers) if settings.layers is not None else default_layers(model)
    sites = [parse_site(f"resid_post.{layer}", adapter.n_layers).name for layer in layers]
    users, train, val = _split_users(pairs, settings.val_items)
    if neutral is None:
        pool = [p for p in pairs if p.source == SELF_GENERATED] or list(pairs)
        neutral = list(dict.fromkeys((p.prompt, p.neutral) for p in pool))[: settings.n_neutral]
    if not neutral and settings.kl_weight > 0:
        raise InputError("the KL term needs neutral (prompt, response) texts; give neutral=... or set kl_weight=0")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # Initialisation: the StyleVector mean difference of the *training* items only (validation stays unseen).
    init_edits = fit_user_edits(model, tokenizer, [p for u in users for p in train[u]], method="stylevector", layers=layers,
                                strength=1.0, min_pairs=1, batch_size=settings.batch_size, progress=False)
    init = torch.stack([torch.stack([e.vector * e.a for e in init_edits[u].edits]) for u in users]) * settings.init_strength

    train_items = {i: _encode_items(tokenizer, [i] * len(train[user]), [(p.prompt, p.personalized) for p in train[user]], settings.max_tokens)
                   for i, user in enumerate(users)}
    val_items = [item for i, user in enumerate(users)
                 for item in _encode_items(tokenizer, [i] * len(val[user]), [(p.prompt, p.personalized) for p in val[user]], settings.max_tokens)]
    neutral_items = _encode_items(tokenizer, [0] * len(neutral), list(neutral), settings.max_tokens)
    preference = {i: [p for p in pairs if p.user_id == user and p.source == SELF_GENERATED] for i, user in enumerate(users)}
    pref_items = {i: [(a, b) for a, b in zip(_encode_items(tokenizer, [i] * len(ps), [(p.prompt, p.personalized) for p in ps], settings.max_tokens),
                                             _encode_items(tokenizer, [i] * len(ps), [(p.prompt, p.neutral) for p in ps], settings.max_tokens))]
                  for i, ps in preference.items()} if settings.preference_weight > 0 else {}

    tables = _Tables(model, sites, init, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # frozen model: only the edit's parameters get gradients
        p.requires_grad_(False)
    handles = tables.hooks()
    try:
        # The first edit is at resid_post.L, block L's output: blocks 0…L-1 are frozen and come before it.
        prefix = _FrozenPrefix(model, min(layers))
        everything = [it for its in train_items.values() for it in its] + val_items + neutral_items
        everything += [it for its in pref_items.values() for pair in its for it in pair]
        with torch.no_grad():
            prefix.fill(everything, settings, pad_id)
            probe = everything[:2]
            tables.row_index = torch.zeros(len(probe), dtype=torch.long)
            prefix_gap = prefix.verify(probe, pad_id)
        # Unsteered references, computed once: neutral logprobs (KL), preference logprobs, validation NLL.
        tables.row_index = torch.zeros(max(len(neutral_items), 1), dtype=torch.long)
        with torch.no_grad():
            neutral_reference = _batched_logprobs(model, neutral_items, pad_id, settings, tables, rows=[0] * len(neutral_items), prefix=prefix)
            pref_reference = {i: [(float(_token_logprob(a_lp, a)), float(_token_logprob(b_lp, b)))
                                  for (a, b), (a_lp, b_lp) in zip(its, _pairs_logprobs(model, its, pad_id, settings, tables, prefix))]
                              for i, its in pref_items.items()}
            unsteered_val = _val_nll(model, val_items, pad_id, settings, tables, steered=False, n_users=len(users), prefix=prefix)
            init_val = _val_nll(model, val_items, pad_id, settings, tables, steered=True, n_users=len(users), prefix=prefix)
        optimizer = torch.optim.Adam(tables.groups)
        best = {i: {"epoch": 0, "val_nll": init_val[i]} for i in range(len(users))}
        snapshot = tables.user_rows(range(len(users)))
        waiting = {i: 0 for i in range(len(users))}
        active = list(range(len(users)))
        history = [{"user_id": users[i], "epoch": 0, "train_nll": float("nan"), "train_kl": float("nan"), "val_nll": init_val[i]} for i in active]
        order = {i: _user_generator(settings.seed, users[i]) for i in active}
        steps = settings.steps_per_epoch or max(len(items) for items in train_items.values())
        # Each user walks the neutral texts from its own offset (a hash of its id, not its place in this batch).
        offset = {i: int(hashlib.sha256(users[i].encode()).hexdigest()[:8], 16) for i in active}
        bar = tqdm(total=settings.epochs, desc=f"train {settings.kind} edits ({len(users)} users)", unit="epoch", disable=not progress)
        for epoch in range(1, settings.epochs + 1):
            if not active:
                break
            perms = {i: torch.randperm(len(train_items[i]), generator=order[i]).tolist() for i in active}
            sums = {i: [0.0, 0.0] for i in active}
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                rows: list[tuple[str, int, Any]] = []
                for i in active:
                    rows.append(("nll", i, train_items[i][perms[i][step % len(perms[i])]]))
                    if settings.kl_weight > 0:
                        j = (epoch * steps + step + offset[i]) % len(neutral_items)
                        rows.append(("kl", i, j))
                    if pref_items.get(i):
                        j = (epoch * steps + step) % len(pref_items[i])
                        rows.append(("pref", i, j))
                losses = _step(model, rows, tables, neutral_items, neutral_reference, pref_items, pref_reference, pad_id, settings, prefix)
                broken = [i for i in sorted(losses) if not all(math.isfinite(float(x)) for x in losses[i])]
                if broken:
                    names = ", ".join(f"{users[i]!r} (NLL {float(losses[i][0])}, KL {float(losses[i][1])})" for i in broken)
                    raise InputError(f"training the edit of user {names} gave a non-finite loss at epoch {epoch}, step {step + 1}: "
                                     "lower the learning rate or check the user's texts; nothing was written")
                for i, (nll, kl, total) in losses.items():
                    sums[i][0] += float(nll) / steps
                    sums[i][1] += float(kl) / steps
                optimizer.step()
            with torch.no_grad():
                current = _val_nll(model, [it for it in val_items if it.user in active], pad_id, settings, tables, steered=True, n_users=len(users),
                                   prefix=prefix)
            improved = [i for i in active if current[i] < best[i]["val_nll"]]
            if improved:
                rows_now = tables.user_rows(improved)
                for k, i in enumerate(improved):
                    best[i] = {"epoch": epoch, "val_nll": current[i]}
                    for s, saved in zip(snapshot, rows_now):
                        s[i] = saved[k]
            for i in list(active):
                history.append({"user_id": users[i], "epoch": epoch, "train_nll": sums[i][0], "train_kl": sums[i][1], "val_nll": current[i]})
                waiting[i] = 0 if i in improved else waiting[i] + 1
                if waiting[i] >= settings.patience:
                    active.remove(i)  # early stop: no rows for this user from now on
            bar.update()
            bar.set_postfix(training=len(active), val_nll=f"{sum(b['val_nll'] for b in best.values()) / len(best):.3f}")
        bar.close()
        tables.restore(range(len(users)), snapshot)
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)

    method = "trained" if settings.kind == "vector" else "trained_lowrank"
    provenance = {
        user: {"n_pairs": len(train[user]), "n_val": len(val[user]), "sites": sites, "best_epoch": best[i]["epoch"],
               "val_nll": best[i]["val_nll"], "init_val_nll": init_val[i], "unsteered_val_nll": unsteered_val[i],
               "kind": settings.kind, **({"rank": tables.bias.shape[-1]} if settings.kind == "lowrank" else {}),
               "objective": f"nll + {settings.kl_weight}*kl" + (f" + {settings.preference_weight}*preference" if pref_items else ""), "seed": settings.seed}
        for i, user in enumerate(users)
    }
    edits = tables.edits(users, model_fingerprint(model), provenance, method)
    summary = {user: {"epoch": best[i]["epoch"], "val_nll": best[i]["val_nll"], "init_val_nll": init_val[i],
                      "unsteered_val_nll": unsteered_val[i], "n_train": len(train[user]), "n_val": len(val[user])} for i, user in enumerate(users)}
    record = {**asdict(settings), "frozen_prefix": {"blocks": prefix.start, "used": prefix.active, "checked_gap": prefix_gap}}
    return TrainResult(edits, history, summary, time.perf_counter() - started, record)


def micro_batches(lengths: Sequence[int], max_rows: int, max_padding: float = float("inf")) -> list[list[int]]:
    """Indices of ``lengths`` grouped into micro-batches: sorted by length (stable), at most ``max_rows``
    each, and a micro-batch's padded size ``rows × longest`` at most ``max_padding ×`` its summed lengths."""
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for k in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        n = lengths[k]  # the longest so far: lengths ascend
        if current and (len(current) == max_rows or (len(current) + 1) * n > max_padding * (real + n)):
            batches.append(current)
            current, real = [], 0
        current.append(k)
        real += n
    if current:
        batches.append(current)
    return batches


def _batched_logprobs(model, items: Sequence[_Item], pad_id: int, settings: TrainSettings, tables: _Tables, rows: Sequence[int],
                      prefix: _FrozenPrefix | None = None) -> list[torch.Tensor]:
    """Log-probabilities of ``items`` (in their order), row ``k`` steered by table row ``rows[k]``, in
    :func:`micro_batches` of similar length."""
    out: list[torch.Tensor | None] = [None] * len(items)
    for part in micro_batches([len(it.input_ids) for it in items], settings.batch_size, settings.max_padding):
        tables.row_index = torch.tensor([rows[k] for k in part], dtype=torch.long)
        for k, lp in zip(part, _forward_logprobs(model, [items[k] for k in part], pad_id, prefix)):
            out[k] = lp.detach()
    return out  # type: ignore[return-value]


def _pairs_logprobs(model, items, pad_id, settings: TrainSettings, tables, prefix=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    flat = [x for pair in items for x in pair]
    lps = _batched_logprobs(model, flat, pad_id, settings, tables, rows=[0] * len(flat), prefix=prefix)
    return list(zip(lps[0::2], lps[1::2]))


def _val_nll(model, items: Sequence[_Item], pad_id: int, settings: TrainSettings, tables: _Tables, *, steered: bool, n_users: int,
             prefix: _FrozenPrefix | None = None) -> dict[int, float]:
    """Mean over each user's validation items of the mean answer-token NLL (nats/token)."""
    if not items:
        return {}
    lps = _batched_logprobs(model, items, pad_id, settings, tables, rows=[(it.user + 1) if steered else 0 for it in items], prefix=prefix)
    per_user: dict[int, list[float]] = {}
    for item, lp in zip(items, lps):
        per_user.setdefault(item.user, []).append(-float(_token_logprob(lp, item)))
    return {u: sum(v) / len(v) for u, v in per_user.items()}


def _step(model, rows, tables: _Tables, neutral_items, neutral_reference, pref_items, pref_reference, pad_id: int,
          settings: TrainSettings, prefix: _FrozenPrefix | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One optimisation step's forward + backward over ``rows`` in micro-batches; gradients accumulate.

    Each user's loss term is ``nll + kl_weight·kl + preference_weight·pref`` over their own rows.
    Returns per user ``(nll, kl, total)`` (detached)."""
    flat: list[tuple[str, int, _Item, Any]] = []  # (role, user, item, extra)
    for role, user, what in rows:
        if role == "nll":
            flat.append(("nll", user, what, None))
        elif role == "kl":
            flat.append(("kl", user, neutral_items[what], neutral_reference[what]))
        else:
            a, b = pref_items[user][what]
            ref = pref_reference[user][what]
            flat.append(("pref+", user, a, ref[0]))
            flat.append(("pref-", user, b, ref[1]))
    # Rows of similar length share a micro-batch: the loss is a sum over rows and gradients accumulate
    # across micro-batches, so the grouping changes nothing but the padding (a mixed batch padded to
    # its longest row costs up to 2x on CPU). Stable sort: deterministic under the seed.
    stats: dict[int, list[torch.Tensor]] = {}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for group in micro_batches([len(row[2].input_ids) for row in flat], settings.batch_size, settings.max_padding):
        part = [flat[k] for k in group]
        tables.row_index = torch.tensor([u + 1 for _, u, _, _ in part], dtype=torch.long)
        logprobs = _forward_logprobs(model, [it for _, _, it, _ in part], pad_id, prefix)
        loss = logprobs[0].new_zeros(())
        for (role, user, item, extra), lp in zip(part, logprobs):
            terms = stats.setdefault(user, [lp.new_zeros(()), lp.new_zeros(()), lp.new_zeros(())])
            if role == "nll":
                nll = -_token_logprob(lp, item)
                loss = loss + nll
                terms[0] = terms[0] + nll.detach()
                terms[2] = terms[2] + nll.detach()
            elif role == "kl":
                p = extra.to(lp.device)
                kl = (p.exp() * (p - lp)).sum(-1).mean()
                loss = loss + settings.kl_weight * kl
                terms[1] = terms[1] + kl.detach()
                terms[2] = terms[2] + settings.kl_weight * kl.detach()
            else:
                # The preference term couples two rows: keep the first half's graph until its partner arrives.
                delta = _token_logprob(lp, item) - extra
                mine = pending.setdefault(user, {})
                mine[role] = delta
                if "pref+" in mine and "pref-" in mine:
                    pref = -torch.nn.functional.logsigmoid(settings.preference_beta * (mine["pref+"] - mine["pref-"]))
                    loss = loss + settings.preference_weight * pref
                    terms[2] = terms[2] + settings.preference_weight * pref.detach()
                    pending.pop(user)
        if loss.requires_grad:
            loss.backward(retain_graph=bool(pending))
    return {u: (t[0], t[1], t[2]) for u, t in stats.items()}


def most_training_items(pairs: Sequence[Pair], val_items: int) -> int:
    """The most training items any user of ``pairs`` has (the default ``steps_per_epoch`` of training them all together)."""
    users, train, _ = _split_users(pairs, val_items)
    return max((len(train[u]) for u in users), default=1)
