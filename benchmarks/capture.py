"""Benchmark: cost of capturing every ``resid_post`` site compared with a plain forward pass.

Run from the repository root::

    python benchmarks/capture.py --threads 1 --repeats 7 [--json out.json]

What is timed (one process, the default model, one batch of ``--batch`` rows x ``--seq`` tokens,
full attention mask, ``torch.no_grad()``, ``torch.set_num_threads(--threads)``):

 1. ``forward CausalLM``      ``model(input_ids, attention_mask, use_cache=False)`` -> logits. The
                               reference "plain forward". ``use_cache=False`` everywhere: none of the
                               methods needs a KV cache, so none pays for building one.
 2. ``forward decoder-only``   ``model.model(...)``: the decoder stack without the LM head. repedit's
                               native capture runs the stack *without* the LM head (and stops after the
                               deepest requested block), so this is its like-for-like reference.
 3. ``HF output_hidden_states`` the CausalLM with ``output_hidden_states=True`` (logits included).
 4. ``repedit native last``    30 ``resid_post`` sites, ``position="last"``, and
 5. ``repedit native all``     the same with ``position="all"``. Each is timed two ways:
      * ``[internal]`` -- ``repedit.capture.activations._run_native`` on a pre-built ``_Batch`` (ids, mask,
        position ids already tensors): exactly the hook path + forward, no tokenisation. This is the
        number to compare with the plain forwards.
      * ``[capture()]`` -- the public ``repedit.capture(model, tok, texts, ...)`` on 8 texts chosen so
        that each tokenises to exactly ``--seq`` tokens (checked at start-up, so the batch has the
        same ids and no padding). This includes tokenisation, the model fingerprint, the run key,
        per-item splitting and concatenation. Tokenisation (``repedit.model.inputs.encode``) and
        ``model_fingerprint`` are also timed on their own and reported separately.
 6. ``nnsight``                ``nnsight.LanguageModel`` wrapping its own deep copy of the model and
                               tokenizer; one ``trace`` saving the 30 ``model.layers[L].output``.
 7. ``TL bridge``              TransformerLens 4 ``TransformerBridge.boot_transformers`` on its own deep
                               copy (it rewires the model in place and switches it to *eager*
                               attention); ``run_with_cache(names_filter=<30 hook_resid_post>)``.
                               ``TL bridge forward`` (no cache) is reported too, to separate the cost
                               of eager attention / the bridge from the cost of caching.

nnsight and transformer_lens are optional: if not importable they are skipped with a note.

Methods are interleaved round-robin (the start of the round rotates every repeat) so that drift in
machine load affects all of them alike; each method gets ``--warmup`` untimed calls first, and the
median of ``--repeats`` timed calls is reported, with the min and max. Ratios to both references are
printed three ways: ratio of medians, ratio of minima (machine contention only ever adds time, so on
a shared machine the minimum is the least noisy estimate), and "paired" (median over repeats of the
method's time divided by the reference's time in the same round).

The model load time is measured first in a fresh subprocess (same thread count): ``import``
(``torch``, ``transformers`` auto classes, ``repedit``) and ``load_model`` (``repedit.load_model()``,
from the safetensors cache when present -- the script says whether it was; the OS page cache is
usually warm, so this is not a cold-disk number).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small brass lamp "
    "and a notebook in which he recorded the weather, the ships that passed, and the birds that rested on "
    "the railing. Over the years the notebook grew into a shelf of volumes, and visitors from the village "
    "would sometimes ask to read them. He never minded; he said the sea belonged to everyone, and so did "
    "its stories. When the storm of that long winter finally broke the old glass, he rebuilt the lantern "
    "room with his own hands, piece by piece, and wrote down every step so that whoever came after him "
    "would know how it was done. Children learned to count by the flashes of the beam, farmers planned "
    "their harvests by his tide tables, and fishermen trusted his forecasts more than the radio."
)

_LOAD_SNIPPET = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (counted as import)
import repedit
from repedit.model import loading as models
t1 = time.perf_counter()
gguf = models.default_gguf_path()
folder = models.cache_dir() / "models" / f"{models.DEFAULT_MODEL}-{models._file_key(gguf)}"
cached = (folder / "repedit-cache.json").exists()
t2 = time.perf_counter()
model, tok = repedit.load_model()
t3 = time.perf_counter()
print("REPEDIT_LOAD_JSON " + json.dumps({"import_s": t1 - t0, "load_model_s": t3 - t2, "cache_hit": cached}))
"""


def measure_load(threads: int) -> dict[str, Any]:
    """Import and ``load_model`` times, measured in a fresh Python process."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SNIPPET, str(threads)], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("REPEDIT_LOAD_JSON "):
            result = json.loads(line.split(" ", 1)[1])
            result["subprocess_wall_s"] = wall
            return result
    return {"error": (proc.stderr or proc.stdout)[-2000:], "subprocess_wall_s": wall}


def build_texts(tokenizer, batch: int, seq: int) -> tuple[list[str], list[list[int]]]:
    """``batch`` texts that each tokenise (as ``repedit.capture`` does) to exactly ``seq`` ids.

    The paragraph is tokenised and tiled; row ``i`` starts at a different token offset. A window is
    accepted only when decoding and re-tokenising it gives back exactly the same ids, so the
    public ``capture()`` path sees the same ``[batch, seq]`` ids as every other method.
    """
    base = tokenizer(PARAGRAPH, add_special_tokens=False)["input_ids"]
    tiled = base * (2 + (seq * (batch + 2)) // max(len(base), 1))
    texts: list[str] = []
    rows: list[list[int]] = []
    start = 0
    while len(rows) < batch:
        if start + seq > len(tiled):
            raise RuntimeError("could not build round-trip-exact token windows from the paragraph")
        window = tiled[start:start + seq]
        text = tokenizer.decode(window)
        ids = list(tokenizer(text)["input_ids"])  # default special tokens, as repedit.model.inputs.encode
        if len(ids) == seq and text.strip() and text not in texts:
            texts.append(text)
            rows.append(ids)
            start += 7  # different windows for different rows
        else:
            start += 1
    return texts, rows


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per method (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per method first (default 2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    parser.add_argument("--skip-load", action="store_true", help="do not measure the load time in a subprocess")
    parser.add_argument("--no-nnsight", action="store_true")
    parser.add_argument("--no-tl", action="store_true")
    args = parser.parse_args(argv)
    started = datetime.datetime.now().isoformat(timespec="seconds")

    load_info = None if args.skip_load else measure_load(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    import repedit
    from repedit.capture.activations import _make_batch, _run_native
    from repedit.model.inputs import context_length, encode

    model, tok = repedit.load_model()
    adapter = repedit.get_adapter(model)
    sites = sorted(repedit.parse_sites("resid_post", adapter.n_layers), key=lambda s: s.layer)
    texts, rows = build_texts(tok, args.batch, args.seq)
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    encoded = encode(tok, texts, max_length=context_length(model, tok))
    assert [e.input_ids for e in encoded] == rows, "capture() would tokenise the texts differently"
    spans = [(0, len(e.input_ids)) for e in encoded]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = _make_batch(encoded, spans, pad_id, "right")
    assert torch.equal(batch.input_ids, input_ids) and bool(batch.attention_mask.all())

    notes: list[str] = []
    methods: dict[str, Callable[[], Any]] = {}
    kind: dict[str, str] = {}

    def add(name: str, fn: Callable[[], Any], what: str) -> None:
        methods[name] = fn
        kind[name] = what

    add("forward CausalLM (reference)", lambda: model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits,
        "forward")
    add("forward decoder-only (no LM head)",
        lambda: model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state, "forward")
    add("HF output_hidden_states=True",
        lambda: model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True).hidden_states,
        "capture")
    for position in ("last", "all"):
        add(f"repedit native {position} [internal]",
            lambda p=position: _run_native(adapter, batch, sites, p, torch.float32),
            "capture")
        add(f"repedit native {position} [capture()]",
            lambda p=position: repedit.capture(model, tok, texts, "resid_post", p, batch_size=args.batch, progress=False),
            "capture")

    nn_model = None
    if args.no_nnsight:
        notes.append("nnsight: skipped (--no-nnsight)")
    else:
        try:
            import nnsight

            nn_hf = copy.deepcopy(model)
            nn_model = nnsight.LanguageModel(nn_hf, tokenizer=copy.deepcopy(tok))

            def run_nnsight():
                saved = []
                with nn_model.trace({"input_ids": input_ids, "attention_mask": attention_mask}):
                    for layer in range(adapter.n_layers):
                        saved.append(nn_model.model.layers[layer].output.save())
                return saved

            add(f"nnsight trace, save {adapter.n_layers} layers", run_nnsight, "capture")
        except Exception as err:  # noqa: BLE001 - optional library, any failure is a skip
            notes.append(f"nnsight: skipped ({type(err).__name__}: {err})")

    bridge = None
    if args.no_tl:
        notes.append("transformer_lens: skipped (--no-tl)")
    else:
        try:
            from transformer_lens.model_bridge import TransformerBridge

            tl_hf = copy.deepcopy(model)
            bridge = TransformerBridge.boot_transformers(
                "repedit-default", hf_model=tl_hf, tokenizer=copy.deepcopy(tok), device="cpu"
            )
            tl_names = {site.tl_name for site in sites}
            add("TL bridge forward (no cache)", lambda: bridge(input_ids, attention_mask=attention_mask), "forward")
            add(f"TL bridge run_with_cache ({len(tl_names)} resid_post)",
                lambda: bridge.run_with_cache(input_ids, names_filter=lambda n: n in tl_names, attention_mask=attention_mask),
                "capture")
        except Exception as err:  # noqa: BLE001
            notes.append(f"transformer_lens: skipped ({type(err).__name__}: {err})")
    notes.append(f"attention implementation: main model {model.config._attn_implementation}"
                 + (f", nnsight copy {nn_hf.config._attn_implementation}" if nn_model is not None else "")
                 + (f", TL bridge copy {tl_hf.config._attn_implementation}" if bridge is not None else ""))

    # Sanity: every method reads the same residual stream (so we time working code, not a no-op).
    with torch.no_grad():
        hs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True).hidden_states
        native_all = _run_native(adapter, batch, sites, "all", torch.float32)
        native_last = _run_native(adapter, batch, sites, "last", torch.float32)
        checks: dict[str, float] = {}
        mid = sites[len(sites) // 2]
        checks["native all vs HF hidden_states (max |diff|, layer %d)" % mid.layer] = float(
            (native_all[mid].reshape(hs[mid.layer + 1].shape) - hs[mid.layer + 1]).abs().max())
        checks["native last vs HF hidden_states[:, -1]"] = float((native_last[mid] - hs[mid.layer + 1][:, -1]).abs().max())
        if nn_model is not None:
            checks["nnsight vs HF"] = float((methods[f"nnsight trace, save {adapter.n_layers} layers"]()[mid.layer] - hs[mid.layer + 1]).abs().max())
        if bridge is not None:
            _, cache = bridge.run_with_cache(input_ids, names_filter=lambda n: n == mid.tl_name, attention_mask=attention_mask)
            checks["TL bridge vs HF (eager vs sdpa)"] = float((cache[mid.tl_name] - hs[mid.layer + 1]).abs().max())
    del hs, native_all, native_last

    # Separate costs inside capture(): tokenisation and the model fingerprint.
    extras: dict[str, list[float]] = {"tokenise 8 texts (repedit.model.inputs.encode)": [], "model_fingerprint(model)": []}

    names = list(methods)
    samples: dict[str, list[float]] = {name: [] for name in names}
    load_before = os.getloadavg()
    wall_start = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.warmup):
            for name in names:
                methods[name]()
        for repeat in range(args.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                t0 = time.perf_counter()
                out = methods[name]()
                t1 = time.perf_counter()
                del out
                samples[name].append(t1 - t0)
            t0 = time.perf_counter()
            encode(tok, texts, max_length=context_length(model, tok))
            extras["tokenise 8 texts (repedit.model.inputs.encode)"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            repedit.model_fingerprint(model)
            extras["model_fingerprint(model)"].append(time.perf_counter() - t0)
    bench_wall = time.perf_counter() - wall_start
    load_after = os.getloadavg()

    med = {name: statistics.median(v) for name, v in samples.items()}
    low = {name: min(v) for name, v in samples.items()}
    ref_full, ref_dec = names[0], names[1]

    def paired(name: str, ref: str) -> float:
        """Median over repeats of (method time / reference time in the same round)."""
        return statistics.median(a / b for a, b in zip(samples[name], samples[ref]))

    print(f"repedit capture benchmark  started {started}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"nproc {os.cpu_count()}  batch {args.batch} x {args.seq} tokens  repeats {args.repeats} (+{args.warmup} warm-up), round-robin")
    if load_info is not None:
        if "error" in load_info:
            print(f"load (fresh subprocess): FAILED: {load_info['error']}")
        else:
            print(f"load (fresh subprocess, {args.threads} thread(s)): import {load_info['import_s']:.2f} s, "
                  f"load_model {load_info['load_model_s']:.2f} s "
                  f"({'from the safetensors cache' if load_info['cache_hit'] else 'NO cache: includes GGUF dequantisation'}), "
                  f"subprocess total {load_info['subprocess_wall_s']:.2f} s")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}  (benchmark loop {bench_wall:.0f} s)")
    print()
    width = max(len(n) for n in names) + 2
    print("ratios: 'med' = ratio of medians, 'min' = ratio of minima (contention only ever adds time, so the")
    print("minimum is the least noisy estimate on a busy machine), 'paired' = median of per-round ratios.")
    header = (f"{'method':<{width}} {'median ms':>9} {'min ms':>8} {'max ms':>8} | {'xCLM med':>8} {'xCLM min':>8} "
              f"{'xCLM pair':>9} | {'xDec med':>8} {'xDec min':>8} {'xDec pair':>9}")
    print(header)
    print("-" * len(header))
    for name in names:
        v = samples[name]
        print(f"{name:<{width}} {fmt_ms(med[name]):>9} {fmt_ms(min(v))} {fmt_ms(max(v))}  "
              f"| {med[name] / med[ref_full]:8.3f} {low[name] / low[ref_full]:8.3f} {paired(name, ref_full):9.3f} "
              f"| {med[name] / med[ref_dec]:8.3f} {low[name] / low[ref_dec]:8.3f} {paired(name, ref_dec):9.3f}")
    print()
    for name, v in extras.items():
        print(f"separately: {name}: median {statistics.median(v) * 1e3:.2f} ms")
    print()
    for name, value in checks.items():
        print(f"check: {name} = {value:.2e}")
    for note in notes:
        print(f"note: {note}")

    if args.json is not None:
        payload = {
            "started": started,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "nproc": os.cpu_count(),
            "batch": args.batch,
            "seq": args.seq,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "load": load_info,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "methods": {
                name: {
                    "median_ms": med[name] * 1e3,
                    "min_ms": min(samples[name]) * 1e3,
                    "max_ms": max(samples[name]) * 1e3,
                    "samples_ms": [s * 1e3 for s in samples[name]],
                    "ratio_causallm": med[name] / med[ref_full],
                    "ratio_decoder_only": med[name] / med[ref_dec],
                    "ratio_causallm_min": low[name] / low[ref_full],
                    "ratio_decoder_only_min": low[name] / low[ref_dec],
                    "ratio_causallm_paired": paired(name, ref_full),
                    "ratio_decoder_only_paired": paired(name, ref_dec),
                    "kind": kind[name],
                }
                for name in names
            },
            "separately_ms": {name: statistics.median(v) * 1e3 for name, v in extras.items()},
            "checks": checks,
            "notes": notes,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
