"""Per-request user steering inside vLLM: a worker extension that applies a repedit store's edits.

How it works (EasySteer / vllm-lens style, on vLLM's v1 engine):

* :class:`RepeditWorkerExtension` is mixed into every vLLM worker (``worker_extension_cls``). Its
  ``repedit_load(store)`` (reached with ``collective_rpc``) reads every user's edit from a repedit
  :class:`~repedit.store.VectorStore` into per-site tables — row 0 = no edit, row i = user i, the same
  tables :func:`repedit.steering.steer` builds (:func:`~repedit.steering.apply.pack_site_tables`) — and
  hooks the decoder layers of those sites.
* Each request names its user in ``SamplingParams.extra_args["repedit_user"]`` (the OpenAI server
  maps a request's ``vllm_xargs`` onto ``extra_args``). A pre-forward hook reads the forward's
  requests in the model runner's order (``input_batch.req_ids``) and their token counts from the
  attention metadata (``query_start_loc``), and gives every token its user's table row; position
  rules (``"prompt"``, ``"generated"``, from token n) use the forward's ``positions`` and each
  request's prompt length. A forward in which no token is steered is left untouched (bit for bit
  plain vLLM), and so are unsteered tokens in a mixed forward.
* vLLM's decoder layer returns ``(hidden, residual)``; ``resid_post`` is their sum, so the edit is
  computed on the sum and written back into ``hidden``.
* Prefix caching would hand a steered request the KV cache an unsteered (or differently steered)
  request computed for the same prompt: every steered request carries ``cache_salt`` =
  ``repedit:<user>:<generation of the user's edit>`` (:func:`cache_salt`), which changes with every
  write of that user's edit.
* The store is re-read when its generation changes (checked at most every ``refresh_seconds`` during
  forwards, or at once with ``repedit_refresh``), so a store update reaches the next requests.
* Hooks need eager execution (``enforce_eager=True``): compiled graphs ignore hooks added after
  compilation, so ``repedit_load`` refuses a compiled model with an error saying so.

Supported edits: every operator of :func:`~repedit.steering.steer` (add, project_out, chameleon,
clamp, gated_add, lowrank) at ``resid_post`` sites, several sites and slots per edit. Other sites
(``attn_out``, ``mlp_out``, ``resid_pre``) are refused, naming the user and site. The model's weights
are not compared with the edit's fingerprint (vLLM's fused weights differ from Hugging Face's); the
architecture family, width and layer count are.

Client-side helpers (:func:`load_llm`, :func:`steered_inputs`, :func:`generate`) import vLLM only
when called; the worker side runs inside vLLM's worker processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import InputError, check_user_id
from ..model.sites import parse_site
from ..steering.apply import _FROM, _GENERATED, _PROMPT, _row_rules, apply_tables, pack_site_tables
from ..store.vectors import VectorStore

log = logging.getLogger("repedit.serve.vllm")
USER_KEY = "repedit_user"  # the extra_args / vllm_xargs key naming a request's user
EXTENSION = "repedit.serve.vllm.RepeditWorkerExtension"


def cache_salt(user: str, version: str) -> str:
    """The prefix-cache salt of a request steered as ``user`` with edit ``version`` (the store's file name
    of that user's edit, ``<user>@<generation>``): KV blocks are shared only between requests with the same
    user and edit. vLLM's OpenAI server accepts at most 128 characters without ``@``, ``/``, ``\\`` or NUL:
    the salt is ``repedit:<user>:<generation>``, or a SHA-256 digest of it when that would be longer."""
    salt = f"repedit:{user}:{version.rsplit('@', 1)[-1]}"
    if len(salt) > 128 or any(c in salt for c in "@/\\\0"):
        salt = "repedit:" + hashlib.sha256(f"{user}\0{version}".encode()).hexdigest()
    return salt


def store_versions(store: VectorStore | str | Path) -> dict[str, str]:
    """``{user: version}`` for every user of ``store``; a version changes with every write of that user's edit."""
    store = store if isinstance(store, VectorStore) else VectorStore(store)
    return {user: entry["file"] for user, entry in store.entries().items()}


# ----------------------------------------------------------------- worker side


@dataclass
class _Loaded:
    """A store as tables on one worker."""

    directory: str
    generation: Any
    users: dict[str, int]  # user -> table row (1-based)
    versions: dict[str, str]
    tables: dict[int, list]  # layer index -> tables (index unset)
    kinds: torch.Tensor | None  # [n_users + 1] position rule of each table row (None: every rule is "all")
    starts: torch.Tensor | None


def _find_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a vLLM model (``model.model.layers`` for the Llama family)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    candidates = [m for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, torch.nn.ModuleList)]
    if not candidates:
        raise InputError(f"cannot find the decoder layers of {type(model).__name__}: repedit's vLLM steering needs a model with .model.layers")
    return max(candidates, key=len)


class _WorkerSteering:
    """The hooks and tables of one worker. Created by :meth:`RepeditWorkerExtension.repedit_load`."""

    def __init__(self, worker, refresh_seconds: float) -> None:
        self.worker, self.refresh_seconds = worker, refresh_seconds
        self.runner = worker.model_runner
        self.model = self.runner.get_model() if hasattr(self.runner, "get_model") else self.runner.model
        config = worker.vllm_config.model_config.hf_config
        self.model_type = getattr(config, "model_type", "")
        self.d_model, self.n_layers = int(config.hidden_size), int(config.num_hidden_layers)
        self.layers = _find_layers(self.model)
        self.device = next(self.model.parameters()).device
        self.loaded: _Loaded | None = None
        self.handles: list = []
        self.checked_at = 0.0
        self.forward_rows: torch.Tensor | None = None  # [tokens] table row of each token in the current forward
        self.forward_mask: torch.Tensor | None = None  # [tokens] bool: tokens the current forward edits
        self.forward_tables: dict[int, list] = {}
        self.unknown_users: set[str] = set()
        # What steering costs this worker (reported by status()): forwards seen, seconds spent in repedit's hooks.
        self.forwards, self.hook_seconds = 0, 0.0

    # -- loading
    def load(self, directory: str) -> dict[str, Any]:
        store = VectorStore(directory)
        index = store._index()
        users = store.list_users()
        edits = []
        for user in users:
            edit = store.get(user)
            fingerprint_family = str(edit.model_fingerprint).split("-", 1)[0]
            if fingerprint_family and self.model_type and fingerprint_family != self.model_type:
                raise InputError(f"{directory}: user {user!r} has an edit for a {fingerprint_family!r} model; vLLM serves a {self.model_type!r} model")
            if edit.d_model != self.d_model:
                raise InputError(f"{directory}: user {user!r} has an edit of width {edit.d_model}; the model's d_model is {self.d_model}")
            for site_edit in edit.edits:
                site = parse_site(site_edit.site, self.n_layers)
                if site.kind != "resid_post":
                    raise InputError(f"{directory}: user {user!r} edits {site_edit.site!r}; repedit's vLLM steering supports resid_post sites only")
            edits.append(edit)
        packed = pack_site_tables(edits, self.n_layers, self.d_model, self.device)
        tables = {parse_site(name, self.n_layers).layer: site_tables for name, site_tables in packed.items()}
        rules = [edit.positions for edit in edits]
        if any(rule != "all" for rule in rules):
            kinds, starts = _row_rules(rules, list(range(len(edits) + 1)))
            kinds, starts = kinds.to(self.device), starts.to(self.device)
        else:
            kinds = starts = None
        # Table rows in the tables' own dtype: vLLM may run in bf16/fp16.
        dtype = next(self.model.parameters()).dtype
        for site_tables in tables.values():
            for i, table in enumerate(site_tables):
                params = {n: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in vars(table.params).items()}
                site_tables[i] = replace(table, params=type(table.params)(**params))
        self.loaded = _Loaded(directory, index.get("generation"), {u: i + 1 for i, u in enumerate(users)}, store_versions(store), tables, kinds, starts)
        self._install()
        self.checked_at = time.monotonic()
        return self.status()

    def _install(self) -> None:
        self.remove()
        self.handles.append(self.layers[0].register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        for layer_index in sorted(self.loaded.tables):
            self.handles.append(self.layers[layer_index].register_forward_hook(self._make_layer_hook(layer_index)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def refresh(self, force: bool = False) -> bool:
        """Re-read the store if its generation changed; True when it did."""
        if self.loaded is None:
            return False
        now = time.monotonic()
        if not force and now - self.checked_at < self.refresh_seconds:
            return False
        self.checked_at = now
        try:
            generation = VectorStore(self.loaded.directory)._index().get("generation")
        except (InputError, OSError) as err:  # keep serving the tables we have
            log.warning("could not read the store %s: %s", self.loaded.directory, err)
            return False
        if generation == self.loaded.generation:
            return False
        self.load(self.loaded.directory)
        return True

    def status(self) -> dict[str, Any]:
        if self.loaded is None:
            return {"loaded": False}
        return {"loaded": True, "store": self.loaded.directory, "generation": self.loaded.generation, "users": sorted(self.loaded.users),
                "versions": dict(self.loaded.versions), "layers": sorted(self.loaded.tables), "hooks": len(self.handles),
                "forwards": self.forwards, "hook_seconds": self.hook_seconds}

    # -- per forward
    def _requests(self, n_requests: int) -> list[Any]:
        batch = self.runner.input_batch
        return [self.runner.requests.get(req_id) for req_id in batch.req_ids[:n_requests]]

    def _pre_forward(self, module, args, kwargs) -> None:
        started = time.perf_counter()
        try:
            self._prepare_forward(args, kwargs)
        finally:
            self.forwards += 1
            self.hook_seconds += time.perf_counter() - started

    def _prepare_forward(self, args, kwargs) -> None:
        self.forward_rows = self.forward_mask = None
        self.forward_tables = {}
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if self.loaded is None or not is_forward_context_available():
            return
        self.refresh()
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):  # micro-batching: one dict per micro-batch
            metadata = metadata[0] if metadata else None
        if isinstance(metadata, dict):
            metadata = next(iter(metadata.values()), None)
        starts = getattr(metadata, "query_start_loc", None)
        if starts is None:  # a profiling or warm-up forward: no requests
            return
        positions = kwargs.get("positions", args[0] if args else None)
        starts = starts.to("cpu").tolist()
        n_requests = len(starts) - 1
        rows, prompt_lengths = [], []
        for request in self._requests(n_requests):
            extra = (getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}) if request is not None else {}
            user = extra.get(USER_KEY)
            row = self.loaded.users.get(user, 0) if isinstance(user, str) else 0
            if isinstance(user, str) and row == 0 and user not in self.unknown_users:
                self.unknown_users.add(user)
                log.warning("no edit for user %r in %s: its requests run unsteered", user, self.loaded.directory)
            rows.append(row)
            prompt_lengths.append(request.num_prompt_tokens if request is not None else 0)
        if not any(rows):
            return
        n_tokens = positions.shape[0]
        counts = torch.tensor([b - a for a, b in zip(starts[:-1], starts[1:])])
        token_rows = torch.zeros(n_tokens, dtype=torch.long)
        filled = int(counts.sum())
        token_rows[:filled] = torch.repeat_interleave(torch.tensor(rows), counts)  # tokens past `filled` are padding: row 0
        token_rows = token_rows.to(self.device)
        mask = token_rows > 0
        if self.loaded.kinds is not None:
            token_prompt = torch.zeros(n_tokens, dtype=torch.long)
            token_prompt[:filled] = torch.repeat_interleave(torch.tensor(prompt_lengths), counts)
            token_prompt = token_prompt.to(self.device)
            kinds, first = self.loaded.kinds[token_rows], self.loaded.starts[token_rows]
            positions = positions.to(self.device).long()
            mask = mask & ~(((kinds == _PROMPT) & (positions >= token_prompt)) | ((kinds == _GENERATED) & (positions < token_prompt))
                            | ((kinds == _FROM) & (positions < first)))
        self.forward_rows, self.forward_mask = token_rows, mask
        self.forward_tables = {layer: [replace(t, index=t.members[token_rows]) for t in tables] for layer, tables in self.loaded.tables.items()}

    def _make_layer_hook(self, layer_index: int):
        def hook(module, args, output):
            tables = self.forward_tables.get(layer_index)
            if not tables or not isinstance(output, tuple) or len(output) != 2:
                return None
            hidden, residual = output
            if residual is None or hidden.dim() != 2:
                return None
            started = time.perf_counter()
            total = hidden + residual  # resid_post [tokens, D]
            edited = apply_tables(total[:, None, :], tables, self.forward_mask[:, None])[:, 0, :]
            out = torch.where(self.forward_mask[:, None], edited - residual, hidden), residual
            self.hook_seconds += time.perf_counter() - started  # on CPU the ops have run; on a GPU this is launch time only
            return out

        return hook


class RepeditWorkerExtension:
    """Methods mixed into every vLLM worker (``worker_extension_cls="repedit.serve.vllm.RepeditWorkerExtension"``),
    called with ``collective_rpc``: ``repedit_load(store)``, ``repedit_refresh()``, ``repedit_status()``,
    ``repedit_unload()``. Each returns a small dict (the store, its generation, users, versions, hooked layers)."""

    def repedit_load(self, store: str, refresh_seconds: float | str = 1.0) -> dict[str, Any]:
        """Load ``store`` (a repedit store directory on the worker's machine) and hook the model.
        ``refresh_seconds`` may come as a string (vLLM's HTTP ``/collective_rpc`` passes strings only)."""
        refresh_seconds = float(refresh_seconds)
        model_config = self.vllm_config.model_config
        if not model_config.enforce_eager:
            raise RuntimeError("repedit steering in vLLM needs enforce_eager=True (vllm serve --enforce-eager): the compiled model "
                               "ignores forward hooks added after compilation, so requests would silently run unsteered")
        steering = getattr(self, "_repedit", None)
        if steering is None:
            steering = _WorkerSteering(self, refresh_seconds)
            self._repedit = steering
        steering.refresh_seconds = refresh_seconds
        return steering.load(str(store))

    def repedit_refresh(self) -> dict[str, Any]:
        """Re-read the store now if it changed."""
        steering = getattr(self, "_repedit", None)
        if steering is None:
            return {"loaded": False}
        steering.refresh(force=True)
        return steering.status()

    def repedit_status(self) -> dict[str, Any]:
        steering = getattr(self, "_repedit", None)
        return steering.status() if steering is not None else {"loaded": False}

    def repedit_unload(self) -> dict[str, Any]:
        """Remove the hooks: the model is plain vLLM again."""
        steering = getattr(self, "_repedit", None)
        if steering is not None:
            steering.remove()
            steering.loaded = None
        return {"loaded": False}


# ----------------------------------------------------------------- client side


def vllm_model_path(model: str | Path) -> str:
    """What vLLM should load for a repedit model spec: the default model or a ``.gguf`` file become the
    safetensors folder repedit caches for it (:func:`repedit.model.loading.model_folder`); a folder or a
    hub id is passed through."""
    from ..model.loading import model_folder

    return str(model_folder(model))


def _engine_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """float32 (as repedit's own models, so outputs compare with :func:`repedit.steering.steer`), and on
    CPU a 1 GiB KV cache unless the caller sizes it: vLLM's CPU backend otherwise reserves 92% of RAM."""
    out = {"dtype": "float32", **kwargs}
    from vllm.platforms import current_platform

    sized = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(out)
    if current_platform.is_cpu() and not sized and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        out["kv_cache_memory_bytes"] = 1 << 30
    return out


def load_llm(model: str | Path, store: VectorStore | str | Path | None = None, *, refresh_seconds: float = 1.0, **llm_kwargs):
    """A ``vllm.LLM`` for ``model`` with repedit's worker extension, and ``store`` loaded on every worker.

    ``llm_kwargs`` go to ``vllm.LLM``; ``enforce_eager`` must stay True (hooks); ``dtype`` defaults to
    float32 and, on CPU, the KV cache to 1 GiB (``kv_cache_memory_bytes``)."""
    from vllm import LLM

    if llm_kwargs.get("enforce_eager") is False:
        raise InputError("repedit steering in vLLM needs enforce_eager=True: the compiled model ignores hooks added after compilation")
    llm_kwargs = {"max_model_len": 2048, **_engine_defaults(llm_kwargs), "enforce_eager": True, "worker_extension_cls": EXTENSION}
    llm = LLM(model=vllm_model_path(model), **llm_kwargs)
    if store is not None:
        directory = store.directory if isinstance(store, VectorStore) else Path(store)
        llm.collective_rpc("repedit_load", args=(str(Path(directory).resolve()), refresh_seconds))
    return llm


def steered_inputs(prompts: Sequence[str | Sequence[int]], users: Sequence[str | None], store: VectorStore | str | Path | None,
                   sampling_params) -> tuple[list[dict[str, Any]], list[Any]]:
    """vLLM prompts and per-request ``SamplingParams`` that steer request i as ``users[i]`` (``None`` =
    unsteered): ``extra_args[repedit_user]`` picks the edit and ``cache_salt`` keeps prefix caching
    per user and edit version. Users must be in ``store`` (an ``InputError`` names the first that is not)."""
    if len(prompts) != len(users):
        raise InputError(f"{len(prompts)} prompts but {len(users)} users: give one user (or None) per prompt")
    versions = store_versions(store) if store is not None else {}
    inputs, params = [], []
    for prompt, user in zip(prompts, users):
        item: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        request_params = sampling_params.clone()
        if user is not None:
            check_user_id(user)
            if user not in versions:
                raise InputError(f"no steering edit for user {user!r} in the store")
            item["cache_salt"] = cache_salt(user, versions[user])
            request_params.extra_args = {**(request_params.extra_args or {}), USER_KEY: user}
        inputs.append(item)
        params.append(request_params)
    return inputs, params


def generate(llm, prompts: Sequence[str | Sequence[int]], users: Sequence[str | None], store: VectorStore | str | Path | None,
             sampling_params, *, use_tqdm: bool = False):
    """``llm.generate`` with request i steered as ``users[i]`` (one mixed batch); returns vLLM's outputs."""
    inputs, params = steered_inputs(prompts, users, store, sampling_params)
    return llm.generate(inputs, params, use_tqdm=use_tqdm)


# ----------------------------------------------------------------- repedit serve --engine vllm


class VLLMEngine:
    """The engine behind ``repedit serve --engine vllm``: the same interface as repedit's own
    :class:`~repedit.serve.engine.Engine` (``start``/``submit``/``stats``/``close``), answered by
    vLLM's ``AsyncLLM`` with this module's worker extension, so the server keeps its authentication,
    validation, store lookup and ``user`` field. Requests are submitted from the server's event loop;
    each becomes one vLLM request with its user in ``extra_args`` and its ``cache_salt``."""

    def __init__(self, model: str | Path, tokenizer, store: VectorStore | str | Path | None, *, max_model_len: int = 2048,
                 refresh_seconds: float = 1.0, **engine_kwargs) -> None:
        if engine_kwargs.get("enforce_eager") is False:
            raise InputError("repedit steering in vLLM needs enforce_eager=True: the compiled model ignores hooks added after compilation")
        self.model_path, self.tokenizer, self.max_model_len = vllm_model_path(model), tokenizer, max_model_len
        self.store = store if isinstance(store, VectorStore) or store is None else VectorStore(store)
        self.refresh_seconds = refresh_seconds
        self.engine_kwargs = engine_kwargs
        from types import SimpleNamespace

        from ..model.generation import _stop_ids

        try:  # the model's own end-of-turn ids, as repedit's engine uses them
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_pretrained(self.model_path)
        except (OSError, ValueError):
            generation_config = None
        self.stop_ids = frozenset(_stop_ids(tokenizer, SimpleNamespace(generation_config=generation_config)))
        self.llm = None
        self._loaded_generation = None
        self._tasks: set = set()
        self._closed = False
        self.counts = {"submitted": 0, "finished": 0, "failed": 0, "cancelled": 0}

    async def astart(self) -> None:
        """Start vLLM (its engine process loads the model) and load the store on every worker."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=self.model_path, max_model_len=self.max_model_len, enforce_eager=True, worker_extension_cls=EXTENSION,
                               **_engine_defaults(self.engine_kwargs))
        self.llm = AsyncLLM.from_engine_args(args)
        if self.store is not None:
            await self.llm.collective_rpc("repedit_load", args=(str(self.store.directory.resolve()), self.refresh_seconds))
            self._loaded_generation = self.store._index().get("generation")

    def start(self) -> "VLLMEngine":  # the server's lifespan awaits astart() instead
        return self

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self._closed and not getattr(self.llm, "errored", False)

    def submit(self, request) -> None:
        """Queue ``request`` (a :class:`~repedit.serve.engine.GenerationRequest`); call from the event loop."""
        import asyncio

        from .engine import EngineClosed

        if not self.alive:
            raise EngineClosed("the vLLM engine is not running")
        self.counts["submitted"] += 1
        task = asyncio.get_running_loop().create_task(self._run(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request) -> None:
        import uuid

        from vllm import SamplingParams as VLLMParams
        from vllm.sampling_params import RequestOutputKind

        from .engine import Done, Failed, Tokens

        def emit(event) -> None:
            if isinstance(event, (Done, Failed)):
                self.counts["failed" if isinstance(event, Failed) else "cancelled" if event.reason == "cancelled" else "finished"] += 1
            try:
                request.on_event(event)
            except Exception:
                log.exception("request event listener raised")

        params = request.params
        prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_ids)}
        extra = None
        try:
            if request.edit is not None:
                user = request.edit.user_id
                if self.store is not None:
                    generation = self.store._index().get("generation")
                    if generation != self._loaded_generation:  # a store write: the workers re-read it before this request
                        await self.llm.collective_rpc("repedit_refresh")
                        self._loaded_generation = generation
                    prompt["cache_salt"] = cache_salt(user, store_versions(self.store)[user])
                extra = {USER_KEY: user}
            sampling = VLLMParams(max_tokens=params.max_tokens, temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p,
                                  seed=params.seed, repetition_penalty=params.repetition_penalty, extra_args=extra,
                                  output_kind=RequestOutputKind.DELTA, skip_special_tokens=False)
            request_id = f"repedit-{uuid.uuid4().hex}"
            produced = 0
            async for output in self.llm.generate(prompt, sampling, request_id):
                if request.cancelled.is_set():
                    await self.llm.abort(request_id)
                    emit(Done("cancelled", len(request.prompt_ids), produced))
                    return
                completion = output.outputs[0]
                ids = tuple(t for t in completion.token_ids if t not in self.stop_ids)
                if ids:
                    produced += len(ids)
                    emit(Tokens(ids))
                if output.finished:
                    emit(Done("length" if completion.finish_reason == "length" else "stop", len(request.prompt_ids), produced))
                    return
        except Exception as err:  # one request's failure stays its own
            log.exception("vLLM request failed")
            emit(Failed(f"generation failed: {type(err).__name__}: {err}"))

    def stats(self) -> dict[str, Any]:
        ended = self.counts["finished"] + self.counts["failed"] + self.counts["cancelled"]
        return {"engine": "vllm", "in_flight": self.counts["submitted"] - ended, "running": len(self._tasks), **self.counts}

    def close(self, timeout: float = 30.0) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self.llm is not None:
            self.llm.shutdown()
