"""Continuous batching with per-row steering: one worker thread owns the model and decodes for many users.

Requests go into a queue. The worker admits waiting requests whenever the running batch has room
(it waits ``batch_window`` seconds when idle, so that requests arriving together are prefilled
together), prefills them as one left-padded batch with their users' edits
(:func:`repedit.steering.steer`, one row per request), merges their KV cache into the running batch,
and then advances every running row by one token per forward. Rows leave the batch as soon as they
finish (end-of-turn token, ``max_tokens``, cancelled), so a long answer never holds up short ones.

A row's greedy tokens equal offline generation (``model.generate`` through
:func:`repedit.model.generation.generate_batch`) with that user's edit: the same prefill (position ids from
the attention mask, logits of the last token only), the same per-step inputs, and padding that is
masked out; rows of a batch never see each other (equal up to float rounding, as any batching).
Sliding-window caches cannot be merged: for such models new requests wait for the running batch.

A prompt longer than ``prefill_chunk`` tokens is prefilled in chunks of that many tokens, in its own KV
cache, between decode steps of the running batch, and joins the batch when its last chunk is done. So
that a long prompt cannot stall short requests, chunks get at most ``long_prefill_share`` of the
worker's time while other rows are decoding (all of it when none are); short prompts are prefilled
at once, ahead of the long prompt's remaining chunks.

Failures stay local: a prefill that raises is retried one request at a time, so only the request
that breaks it fails; a decode step that raises fails the rows running in it; a row whose logits
are not finite fails alone; the worker keeps running. The engine must be the only user of the model
while it runs (steering hooks are model-wide).
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..io import InputError
from ..model.generation import _stop_ids, left_pad
from ..steering import UserEdit, steer
from .kv import can_merge, merge_caches, select_rows, trim_left

log = logging.getLogger("repedit.serve")


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. ``temperature`` 0 (or below 1e-5) is greedy (argmax, as offline generation);
    otherwise tokens are sampled from ``softmax(logits / temperature)`` restricted to the nucleus
    ``top_p``, with a generator of the request's own (``seed``: repeatable whatever else is in the
    batch). ``repetition_penalty`` is Hugging Face's (divides positive logits of tokens already in
    the prompt or the answer, multiplies negative ones; 1 = off)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 decode greedily, as in vLLM: dividing float32 logits by less is 0/0 or inf."""
        return self.temperature < 1e-5

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise InputError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


@dataclass(frozen=True)
class Tokens:
    """New token ids of a request (end-of-turn tokens are never sent)."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class Done:
    """The request finished: ``reason`` is ``"stop"`` (end-of-turn token), ``"length"`` (``max_tokens``
    reached) or ``"cancelled"``; token counts exclude the end-of-turn token."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request failed (its forward raised, or its logits were not finite); others are unaffected."""

    message: str


Event = Tokens | Done | Failed


class Overloaded(RuntimeError):
    """The request queue is full; retry later."""


class EngineClosed(RuntimeError):
    """The engine is not running."""


@dataclass(eq=False)
class GenerationRequest:
    """One request: prompt token ids, the user's edit (``None`` = unsteered), decoding parameters, and
    ``on_event`` — called from the worker thread with :class:`Tokens`, then exactly one :class:`Done`
    or :class:`Failed`. It must be quick and must not raise (exceptions are logged and ignored)."""

    prompt_ids: Sequence[int]
    edit: UserEdit | None
    params: SamplingParams
    on_event: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (its row leaves the batch at the next step)."""
        self.cancelled.set()


@dataclass(eq=False)
class _Prefill:
    """A long prompt being prefilled chunk by chunk: its row, its own KV cache, and tokens done so far."""

    row: "_Row"
    cache: Any
    done: int = 0


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    counts: dict[str, int]  # the engine's counters
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finished: bool = False

    def emit(self, event: Event) -> None:
        if isinstance(event, (Done, Failed)):
            self.finished = True
            self.counts["failed" if isinstance(event, Failed) else "cancelled" if event.reason == "cancelled" else "finished"] += 1
        try:
            self.request.on_event(event)
        except Exception:  # a broken listener must not take the worker down
            log.exception("request event listener raised")


class Engine:
    """The batching worker. ``start()`` it, ``submit()`` requests from any thread, ``close()`` it.

    Args:
        max_batch_size: most rows decoded together.
        batch_window: seconds an idle worker waits after the first request for more to arrive.
        max_queue: most requests waiting; beyond it :meth:`submit` raises :class:`Overloaded`.
        prefill_chunk: prompts longer than this many tokens are prefilled in chunks of this size
            (``None``: every prompt in one forward). Models whose KV caches cannot be merged
            (sliding-window layers) always prefill whole prompts.
        long_prefill_share: the most of the worker's time that chunks take while other rows decode,
            in (0, 1]: short requests then run at least ``1 - long_prefill_share`` of their solo speed.
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 64, batch_window: float = 0.005, max_queue: int = 4096,
                 prefill_chunk: int | None = 128, long_prefill_share: float = 0.25) -> None:
        if max_batch_size < 1:
            raise InputError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be at least 1 token (or None), got {prefill_chunk}")
        if not 0.0 < long_prefill_share <= 1.0:
            raise InputError(f"long_prefill_share must be in (0, 1], got {long_prefill_share}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.batch_window = max_batch_size, batch_window
        self.prefill_chunk, self.long_prefill_share = prefill_chunk, long_prefill_share
        self._prefilling: list[_Prefill] = []  # long prompts, first in first out
        self._chunk_debt = 0.0  # seconds of decoding owed before the next chunk may run (see _loop)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = frozenset(_stop_ids(tokenizer, model))
        self.device = next(model.parameters()).device
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self._queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The running batch: rows, their KV cache, attention mask [B, T] and next input token [B].
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._next: torch.Tensor | None = None
        self._handle = None  # steering hooks for the running batch's composition
        self._continuous: bool | None = None  # can new rows join a running batch (plain KV caches)?
        # Counters for /health, tests and benchmarks: decode forwards (steps) and the rows they
        # carried, prefill forwards and their rows, requests admitted into a running batch, the
        # largest batch seen, and how requests ended.
        self.counts = {"steps": 0, "step_rows": 0, "prefills": 0, "prefill_rows": 0, "prefill_chunks": 0, "joined_running_batch": 0,
                       "peak_batch": 0, "finished": 0, "failed": 0, "cancelled": 0}
        # Seconds spent in prefill and decode forwards, and in whole worker iterations that did work
        # (forwards + bookkeeping); wall time minus "busy" is time the worker waited for requests.
        self.seconds = {"prefill": 0.0, "decode": 0.0, "busy": 0.0}
        self._submitted = 0
        self._submit_lock = threading.Lock()

    # ----------------------------------------------------------------- public API

    def start(self) -> "Engine":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="repedit-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests still queued or running are cancelled."""
        with self._submit_lock:  # no submit can slip in between the worker's exit and the drain below
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self._drain()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request`` (thread-safe). Raises :class:`EngineClosed` or :class:`Overloaded`."""
        with self._submit_lock:
            if not self.alive or self._stop.is_set():
                raise EngineClosed("the generation engine is not running")
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                raise Overloaded(f"too many requests waiting ({self._queue.maxsize}); retry later") from None
            self._submitted += 1

    def stats(self) -> dict[str, int]:
        """Rows running now, requests waiting, requests submitted and not yet ended (``in_flight``), and
        long prompts being prefilled in chunks (``prefilling``), and the counters (see ``counts``).
        ``in_flight == 0`` and ``running == 0``: idle, no hooks on the model."""
        ended = self.counts["finished"] + self.counts["failed"] + self.counts["cancelled"]
        seconds = {f"{k}_seconds": round(v, 3) for k, v in self.seconds.items()}
        return {"running": len(self._rows), "prefilling": len(self._prefilling), "waiting": self._queue.qsize(), "in_flight": self._submitted - ended,
                **self.counts, **seconds}

    # ----------------------------------------------------------------- worker

    def _loop(self) -> None:
        with torch.no_grad():
            while not self._stop.is_set():
                try:
                    new = self._collect()
                    start = time.perf_counter()
                    busy = bool(new or self._rows or self._prefilling)
                    if new:
                        chunked = [self._chunked(r) for r in new]  # once per request: it may build a cache to look at
                        short = [r for r, c in zip(new, chunked) if not c]
                        self._prefilling += [_Prefill(_Row(r, self.counts, generator=_generator(r.params)), self._new_cache())
                                             for r, c in zip(new, chunked) if c]
                        if short:
                            self._admit(short)
                    if self._rows:
                        self._decode()
                    # Chunks run back to back when nothing else decodes; otherwise each chunk of d seconds is
                    # followed by d * (1 - share) / share seconds of decode steps before the next one.
                    if self._prefilling and (not self._rows or self._chunk_debt <= 0):
                        self._prefill_next_chunk()
                    if not self._rows:
                        self._chunk_debt = 0.0
                    if busy:
                        self.seconds["busy"] += time.perf_counter() - start
                except Exception as err:  # last resort: fail what is running, keep serving
                    log.exception("engine step failed")
                    self._fail_running(f"internal error: {type(err).__name__}: {err}")
        self._fail_running("the server is shutting down", cancelled=True)
        self._drain()

    def _drain(self) -> None:
        """Cancel every request still queued."""
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            _Row(request, self.counts).emit(Done("cancelled", len(request.prompt_ids), 0))

    def _collect(self) -> list[GenerationRequest]:
        room = self.max_batch_size - len(self._rows) - len(self._prefilling)
        if room <= 0 or (self._rows and not self._continuous):
            return []
        taken: list[GenerationRequest] = []
        if not self._rows and not self._prefilling:  # idle: block for the first request, then gather for a short window
            try:
                taken.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                return []
            deadline = time.monotonic() + self.batch_window
            while len(taken) < room and (remaining := deadline - time.monotonic()) > 0:
                try:
                    taken.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
        while len(taken) < room:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        live = []
        for request in taken:
            if request.cancelled.is_set():
                _Row(request, self.counts).emit(Done("cancelled", len(request.prompt_ids), 0))
            else:
                live.append(request)
        return live

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            **{self._cache_arg: cache}, **self._extra,
        )

    def _steer(self, rows: list[_Row], prompt_lengths: list[int] | None = None):
        edits = [row.request.edit for row in rows]
        return steer(self.model, edits, [i if e is not None else None for i, e in enumerate(edits)], prompt_lengths)

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _chunked(self, request: GenerationRequest) -> bool:
        """Is ``request``'s prompt prefilled in chunks? Only prompts longer than a chunk, and only when
        the finished cache can join the running batch (plain KV layers: known after the first prefill,
        or read from a fresh cache's layer types)."""
        if self.prefill_chunk is None or len(request.prompt_ids) <= self.prefill_chunk:
            return False
        if self._continuous is None:
            from transformers.cache_utils import DynamicLayer

            layers = getattr(self._new_cache(), "layers", None)
            return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
        return self._continuous

    def _prefill_next_chunk(self) -> None:
        """Feed the next ``prefill_chunk`` tokens of the oldest long prompt; after its last chunk the
        request joins the running batch exactly as a whole-prompt prefill would."""
        job = self._prefilling[0]
        row, request = job.row, job.row.request
        if request.cancelled.is_set():
            self._prefilling.pop(0)
            row.emit(Done("cancelled", len(request.prompt_ids), 0))
            return
        total = len(request.prompt_ids)
        end = min(job.done + self.prefill_chunk, total)
        ids = torch.tensor([list(request.prompt_ids[job.done:end])], device=self.device)
        mask = torch.ones(1, end, dtype=torch.long, device=self.device)  # one row, no padding
        position_ids = torch.arange(job.done, end, device=self.device)[None]
        self._release_handle()  # the running batch's hooks must not see this forward
        start = time.perf_counter()
        try:
            with self._steer([row], prompt_lengths=[total]):
                logits = self._forward(ids, mask, position_ids, job.cache).logits[:, -1, :]
        except Exception as err:
            log.exception("prefill chunk failed")
            self._prefilling.pop(0)
            row.emit(Failed(f"generation failed: {type(err).__name__}: {err}"))
            return
        elapsed = time.perf_counter() - start
        self.seconds["prefill"] += elapsed
        self.counts["prefill_chunks"] += 1
        self._chunk_debt += elapsed * (1.0 - self.long_prefill_share) / self.long_prefill_share
        job.done = end
        if end < total:
            return
        self._prefilling.pop(0)
        self.counts["prefills"] += 1
        self.counts["prefill_rows"] += 1
        if self._continuous is None:
            self._continuous = can_merge(job.cache)
        self._join([row], job.cache, mask, logits)

    def _admit(self, requests: list[GenerationRequest]) -> None:
        """Prefill ``requests`` together and merge the rows that go on into the running batch."""
        self._release_handle()  # the running batch's hooks must not see the prefill forward
        rows = [_Row(r, self.counts, generator=_generator(r.params)) for r in requests]
        ids, mask = left_pad([list(r.prompt_ids) for r in requests], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as model.generate does
        cache = self._new_cache()
        start = time.perf_counter()
        try:
            with self._steer(rows):
                logits = self._forward(ids, mask, position_ids, cache).logits[:, -1, :]
        except Exception as err:  # only these requests were in the forward
            if len(requests) > 1:  # admit them one by one, so that only the request that fails fails
                for request in requests:
                    self._admit([request])
                return
            log.exception("prefill failed")
            for row in rows:
                row.emit(Failed(f"generation failed: {type(err).__name__}: {err}"))
            return
        self.seconds["prefill"] += time.perf_counter() - start
        self.counts["prefills"] += 1
        self.counts["prefill_rows"] += len(rows)
        if self._continuous is None:
            self._continuous = can_merge(cache)
        self._join(rows, cache, mask, logits)

    def _join(self, rows: list[_Row], cache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Choose the first tokens of freshly prefilled ``rows`` (``logits`` [B, V]) and merge the rows that
        go on, with their ``cache`` and ``mask``, into the running batch."""
        try:
            tokens = self._choose(rows, logits)
        except Exception as err:  # these rows are in no batch yet: the loop's last resort would not reach them
            log.exception("choosing the first tokens failed")
            for row in rows:
                if not row.finished:
                    row.emit(Failed(f"generation failed: {type(err).__name__}: {err}"))
            return
        keep = [i for i, row in enumerate(rows) if not row.finished]
        if not keep:
            return
        if len(keep) < len(rows):
            select_rows(cache, keep)
            mask, tokens = mask[keep], tokens[keep]
            rows = [rows[i] for i in keep]
            if self._continuous:
                mask = trim_left(cache, mask)
        if self._rows:
            self.counts["joined_running_batch"] += len(rows)
            self._cache, self._mask = merge_caches(self._cache, self._mask, cache, mask)
            self._next = torch.cat([self._next, tokens])
            self._rows = self._rows + rows
        else:
            self._cache, self._mask, self._next, self._rows = cache, mask, tokens, rows
        self.counts["peak_batch"] = max(self.counts["peak_batch"], len(self._rows))
        self._release_handle()

    def _decode(self) -> None:
        """One forward for every running row; rows that finish leave the batch."""
        rows = self._rows
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        position_ids = self._mask.sum(-1, keepdim=True) - 1
        if self._handle is None:
            self._handle = self._steer(rows)
        start = time.perf_counter()
        try:
            logits = self._forward(self._next[:, None], self._mask, position_ids, self._cache).logits[:, -1, :]
        except Exception as err:
            log.exception("decode step failed")
            self._fail_running(f"generation failed: {type(err).__name__}: {err}")
            return
        elapsed = time.perf_counter() - start
        self.seconds["decode"] += elapsed
        self._chunk_debt -= elapsed
        self.counts["steps"] += 1
        self.counts["step_rows"] += len(rows)
        self._next = self._choose(rows, logits)
        keep = [i for i, row in enumerate(rows) if not row.finished]
        if len(keep) == len(rows):
            return
        self._release_handle()
        if not keep:
            self._reset()
            return
        select_rows(self._cache, keep)
        self._mask, self._next = self._mask[keep], self._next[keep]
        self._rows = [rows[i] for i in keep]
        if self._continuous:
            self._mask = trim_left(self._cache, self._mask)

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Pick each row's next token from ``logits`` [B, V], send events, mark finished rows.

        Returns the chosen tokens ``[B]`` (finished rows included, they are dropped by the caller)."""
        logits = logits.float()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        penalised = [i for i, row in enumerate(rows) if row.request.params.repetition_penalty != 1.0]
        if penalised:
            logits = logits.clone()
            for i in penalised:
                seen = list(rows[i].request.prompt_ids) + rows[i].generated
                _penalise(logits[i], torch.tensor(seen, device=logits.device), rows[i].request.params.repetition_penalty)
        chosen = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            params = row.request.params
            if not params.greedy and finite[i]:
                chosen[i] = _sample(logits[i], params, row.generator)
        tokens = chosen.tolist()
        for i, row in enumerate(rows):
            request = row.request
            if request.cancelled.is_set():
                row.emit(Done("cancelled", len(request.prompt_ids), len(row.generated)))
            elif not finite[i]:
                row.emit(Failed("the model produced non-finite logits for this request (is the user's edit too strong?)"))
            elif tokens[i] in self.stop_ids:
                row.emit(Done("stop", len(request.prompt_ids), len(row.generated)))
            else:
                row.generated.append(tokens[i])
                row.emit(Tokens((tokens[i],)))
                if len(row.generated) >= request.params.max_tokens:
                    row.emit(Done("length", len(request.prompt_ids), len(row.generated)))
        return chosen

    def _release_handle(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _reset(self) -> None:
        self._release_handle()
        self._rows, self._cache, self._mask, self._next = [], None, None, None

    def _fail_running(self, message: str, cancelled: bool = False) -> None:
        prefilling, self._prefilling = self._prefilling, []
        for row in self._rows + [job.row for job in prefilling]:
            if not row.finished:
                row.emit(Done("cancelled", len(row.request.prompt_ids), len(row.generated)) if cancelled else Failed(message))
        self._reset()


def _generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def _penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """Hugging Face's repetition penalty on one row ``[V]``, in place."""
    scores = logits.gather(0, seen)
    logits.scatter_(0, seen, torch.where(scores < 0, scores * penalty, scores / penalty))


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from ``softmax(logits / temperature)`` within the ``top_p`` nucleus (CPU generator)."""
    # The max is subtracted before dividing: logits / 1e-300 overflows to inf (and softmax to NaN), whereas
    # (logits - max) / 1e-300 is 0 for the argmax and -inf elsewhere — the greedy limit.
    logits = logits.cpu()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
