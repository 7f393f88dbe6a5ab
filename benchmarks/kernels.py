"""Per-row edit kernels: CPU reference eager vs torch.compile vs a naive loop; on a GPU, achieved
memory bandwidth of each Triton kernel and the decode-step cost of steering.

CPU half (always): for gather-add ``h + V[idx]``, the projection edit ``h − b·(h·u)u`` (direction and
k=4 subspace) and the fused residual add + edit + RMSNorm, at a decode shape (B=32 rows × 1 token)
and a prefill shape (B·T = 32 × 128 = 4096 tokens), d=576 (the default model), fp32, prints µs per
call of three implementations of the same formula:

* ``naive loop`` — a Python loop over batch rows (one small op per row);
* ``eager`` — :mod:`repedit.kernels.reference` (what the steering hooks run on CPU);
* ``compiled`` — ``repedit.kernels.compiled(name, dynamic=False)`` = ``torch.compile`` of the
  reference (inductor), specialised to each shape; the first call per shape compiles (printed).

Each figure is the median (and min) over ``--repeats`` rounds, each the mean of a fixed number of
calls; implementations alternate round by round. Results are checked equal across implementations.
Last, the steering ``add`` hook's arithmetic: ``kernels.gather_add`` (what the hook calls now) vs the
inline expression the hook used before the kernels (bit-identical; the difference is the dispatch and
the scalar read that detects ``idx = -1`` rows).

GPU half (only when ``torch.cuda.is_available()``; never under ``TRITON_INTERPRET``, whose timings mean
nothing): for each Triton kernel, time per call (``triton.testing.do_bench``), bytes it must move and
achieved bandwidth against the card's peak from :data:`PEAK_GBPS` (target ≥ 80 %), next to a plain
``clone`` (the copy bandwidth torch reaches). Then the default model on the GPU (bf16), 32 rows with
KV cache: the time of one decode step unsteered, steered through the hooks (Triton gather-add), and
steered with :func:`repedit.steering.fused_steering` (target ≤ 1.03× unsteered). Every GPU figure is
printed with the device name.

Fused attention (:func:`repedit.kernels.attention_edit`: attention + ``o_proj`` + per-row edit, the
default model's layer shape H=9, Hkv=3, hd=64, d=576): at decode (32 rows × 1 query, 256 keys) and
prefill (8 × 128), unsteered (every row ``idx = -1``) vs steered (``add``; projection + add) vs the
composition it replaces (SDPA, ``o_proj``, then ``gather_add``/``project_edit``). On CPU only the
pure-torch reference runs (it prints that the kernel's figures need a GPU); on CUDA the Triton
kernel, and the model's decode step with ``attn_out.12`` edits through ``fused_steering``.

    python benchmarks/kernels.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from repedit import kernels, steering
from repedit.kernels import reference

# Peak DRAM bandwidth in GB/s (vendor data sheets), matched against torch.cuda.get_device_name().
PEAK_GBPS = {
    "H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100": 1555,
    "L40S": 864, "L40": 864, "L4": 300, "A10G": 600, "A10": 600, "RTX 4090": 1008, "RTX 3090": 936, "T4": 320, "V100": 900,
}


def peak_gbps(name: str) -> float | None:
    for key, value in PEAK_GBPS.items():  # most specific keys first
        if key in name:
            return float(value)
    return None


# ----------------------------------------------------------------------------------- inputs and loops


def inputs(B: int, T: int, d: int, users: int = 33, k: int = 4, device="cpu", dtype=torch.float32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(users, d, k, generator=g)).Q.transpose(1, 2).contiguous()
    data = dict(
        h=torch.randn(B, T, d, generator=g), x=torch.randn(B, T, d, generator=g), table=torch.randn(users, d, generator=g),
        idx=torch.randint(0, users, (B,), generator=g), basis=basis, direction=basis[:, 0].contiguous(),
        strength=torch.rand(users, generator=g), weight=torch.randn(d, generator=g),
    )
    data = {name: value.to(device) for name, value in data.items()}
    for name in ("h", "x", "weight"):
        data[name] = data[name].to(dtype)
    return data


def naive_gather_add(h, idx, table):
    out = torch.empty_like(h)
    for b in range(h.shape[0]):
        out[b] = h[b] + table[idx[b]]
    return out


def naive_project_edit(h, idx, basis, strength):
    out = torch.empty_like(h)
    for b in range(h.shape[0]):
        i = idx[b]
        u = basis[i].reshape(-1, h.shape[-1])
        out[b] = h[b] - strength[i] * ((h[b] @ u.T) @ u)
    return out


def naive_add_edit_rms_norm(residual, idx, table, weight, eps, x):
    r, y = torch.empty_like(residual), torch.empty_like(residual)
    for b in range(residual.shape[0]):
        row = x[b] + residual[b] + table[idx[b]]
        r[b] = row
        y[b] = weight * (row * torch.rsqrt(row.pow(2).mean(-1, keepdim=True) + eps))
    return r, y


def cases(data: dict) -> dict:
    """name -> (reference op name, args, naive loop)."""
    d = data
    return {
        "gather_add": ("gather_add", (d["h"], d["idx"], d["table"]), lambda: naive_gather_add(d["h"], d["idx"], d["table"])),
        "project_edit (direction)": ("project_edit", (d["h"], d["idx"], d["direction"], d["strength"]),
                                     lambda: naive_project_edit(d["h"], d["idx"], d["direction"], d["strength"])),
        "project_edit (k=4 subspace)": ("project_edit", (d["h"], d["idx"], d["basis"], d["strength"]),
                                        lambda: naive_project_edit(d["h"], d["idx"], d["basis"], d["strength"])),
        "add + edit + RMSNorm": ("add_edit_rms_norm", (d["h"], d["idx"], d["table"], d["weight"], 1e-5, d["x"]),
                                 lambda: naive_add_edit_rms_norm(d["h"], d["idx"], d["table"], d["weight"], 1e-5, d["x"])),
    }


def first(out):
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------- CPU half


def cpu_half(args) -> list[dict]:
    rows = []
    for label, (B, T) in (("decode 32x1", (32, 1)), ("prefill 32x128", (32, 128))):
        data = inputs(B, T, args.d)
        for name, (op, op_args, naive) in cases(data).items():
            eager = lambda: getattr(reference, op)(*op_args)  # noqa: E731
            compiled_fn = kernels.compiled(op, dynamic=False)  # specialised per shape (recompiles on a new shape)
            start = time.perf_counter()
            compiled_out = compiled_fn(*op_args)
            compile_s = time.perf_counter() - start
            torch.testing.assert_close(first(compiled_out), first(eager()), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(first(naive()), first(eager()), rtol=1e-4, atol=1e-4)
            impls = {"naive loop": naive, "eager": eager, "compiled": lambda: compiled_fn(*op_args)}
            calls = max(3, int(args.budget_ms * 1e3 / max(1.0, _once_us(eager))))
            samples = {key: [] for key in impls}
            for _ in range(args.repeats):
                for key, fn in impls.items():
                    samples[key].append(_mean_us(fn, calls))
            med = {key: statistics.median(v) for key, v in samples.items()}
            low = {key: min(v) for key, v in samples.items()}
            rows.append(dict(shape=label, op=name, calls=calls, compile_s=compile_s, median_us=med, min_us=low))
            print(f"{label:<15} {name:<28} naive {med['naive loop']:9.1f}  eager {med['eager']:9.1f}  compiled {med['compiled']:9.1f} µs"
                  f"  | eager/compiled {med['eager'] / med['compiled']:5.2f}x  naive/eager {med['naive loop'] / med['eager']:5.2f}x"
                  f"  (min: {low['naive loop']:.1f} / {low['eager']:.1f} / {low['compiled']:.1f}; first compile {compile_s:.1f} s)", flush=True)
    for label, (B, T) in (("decode 32x1", (32, 1)), ("prefill 32x128", (32, 128))):
        d = inputs(B, T, args.d)
        impls = {
            "previous inline": lambda: d["h"] + d["table"].index_select(0, d["idx"]).to(d["h"].dtype)[:, None, :],
            "kernels.gather_add": lambda: kernels.gather_add(d["h"], d["idx"], d["table"]),
        }
        assert torch.equal(impls["previous inline"](), impls["kernels.gather_add"]())
        calls = max(3, int(args.budget_ms * 1e3 / max(1.0, _once_us(impls["previous inline"]))))
        samples = {key: [] for key in impls}
        for _ in range(args.repeats):
            for key, fn in impls.items():
                samples[key].append(_mean_us(fn, calls))
        low = {key: min(v) for key, v in samples.items()}
        rows.append(dict(shape=label, op="steering add hook", min_us=low, median_us={k: statistics.median(v) for k, v in samples.items()}))
        print(f"{label:<15} {'steering add hook':<28} previous inline {low['previous inline']:8.1f}  kernels.gather_add {low['kernels.gather_add']:8.1f} µs (min)"
              f"  ratio {low['kernels.gather_add'] / low['previous inline']:5.2f}x  (bit-identical)", flush=True)
    return rows


def _once_us(fn) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def _mean_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


# ----------------------------------------------------------------------------------- GPU half


def bytes_moved(op: str, data: dict, args: tuple) -> int:
    """DRAM bytes a kernel must move: hidden states in and out, the gathered table rows, the indices."""
    h = data["h"]
    n_tokens, d, size = h.numel() // h.shape[-1], h.shape[-1], h.element_size()
    rows = h.shape[0]
    if op == "gather_add":
        return 2 * n_tokens * d * size + rows * d * data["table"].element_size() + rows * 8
    if op == "project_edit":
        basis = args[2]
        k = basis.shape[1] if basis.ndim == 3 else 1
        return 2 * n_tokens * d * size + rows * k * d * basis.element_size() + rows * 8
    # add_edit_rms_norm with x: read r and x, write r' and y
    return 4 * n_tokens * d * size + rows * d * data["table"].element_size() + d * data["weight"].element_size() + rows * 8


def gpu_kernels(args, device_name: str) -> list[dict]:
    from triton.testing import do_bench

    peak = peak_gbps(device_name)
    rows = []
    for label, (B, T, d, dtype) in (
        ("decode 32x1 d576 bf16", (32, 1, 576, torch.bfloat16)),
        ("prefill 32x128 d576 bf16", (32, 128, 576, torch.bfloat16)),
        ("prefill 64x256 d4096 bf16", (64, 256, 4096, torch.bfloat16)),
    ):
        data = inputs(B, T, d, device="cuda", dtype=dtype)
        copy_ms = do_bench(lambda: data["h"].clone())
        copy_gbps = 2 * data["h"].numel() * data["h"].element_size() / copy_ms / 1e6
        for name, (op, op_args, _) in cases(data).items():
            fn = getattr(kernels, op)
            ms = do_bench(lambda: fn(*op_args))
            ref_ms = do_bench(lambda: getattr(reference, op)(*op_args))
            gbps = bytes_moved(op, data, op_args) / ms / 1e6
            row = dict(device=device_name, shape=label, op=name, us=ms * 1e3, reference_us=ref_ms * 1e3, gbps=gbps,
                       peak_gbps=peak, fraction_of_peak=(gbps / peak if peak else None), clone_gbps=copy_gbps)
            rows.append(row)
            print(f"[{device_name}] {label:<26} {name:<28} {ms * 1e3:8.1f} µs  {gbps:7.0f} GB/s"
                  f"  = {100 * gbps / peak if peak else float('nan'):5.1f}% of peak {peak or '?'} (target >= 80%)"
                  f"  | clone {copy_gbps:6.0f} GB/s | torch reference {ref_ms * 1e3:8.1f} µs", flush=True)
    return rows


def decode_steps(args, device: str, dtype: torch.dtype, label: str) -> dict:
    """One decode step (32 rows, KV cache) unsteered, steered by hooks, steered fused: median ms."""
    from transformers import DynamicCache

    from repedit import load_model, model_fingerprint
    from repedit.model.generation import left_pad, render_chat
    from repedit.pairs.users import demo_prompts
    from repedit.steering import SiteEdit, UserEdit, steer

    model, tokenizer = load_model()
    model = model.to(device=device, dtype=dtype).eval()
    fingerprint = model_fingerprint(model)
    torch.manual_seed(0)
    d = model.config.hidden_size
    users = [UserEdit(f"user{i}", [SiteEdit("resid_post.12", "add", vector=torch.nn.functional.normalize(torch.randn(d), dim=0) * 25)], fingerprint, d)
             for i in range(args.rows)]
    attn_users = [UserEdit(f"user{i}", [SiteEdit("attn_out.12", "add", vector=torch.nn.functional.normalize(torch.randn(d), dim=0) * 5)], fingerprint, d)
                  for i in range(args.rows)]
    prompts = (demo_prompts() * args.rows)[: args.rows]
    ids, mask = left_pad([render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts], tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits
    prefix = ids.shape[1]
    step_ids = logits[:, -1].argmax(-1, keepdim=True)
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> float:
        extra = cache.get_seq_length() - prefix
        if extra > 0:
            cache.crop(-extra)  # drop the previous step's token (negative = tokens to remove)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model(step_ids, attention_mask=step_mask, cache=cache, use_cache=True)
        sync()
        return (time.perf_counter() - start) * 1e3

    modes = {
        "unsteered": lambda: _Null(),
        "steered (hooks)": lambda: steer(model, users, list(range(args.rows))),
        "steered (fused_steering)": lambda: steering.fused_steering(model, users, list(range(args.rows))),
        "attn_out.12 add (fused attention)": lambda: steering.fused_steering(model, attn_users, list(range(args.rows)), force=True),
        "attn_out.12 add (hooks)": lambda: steer(model, attn_users, list(range(args.rows))),
    }
    samples = {name: [] for name in modes}
    for _ in range(args.decode_rounds):
        for name, make in modes.items():
            with make():
                for _ in range(3):
                    step()  # warm-up inside the context
                samples[name].extend(step() for _ in range(args.decode_steps))
    med = {name: statistics.median(v) for name, v in samples.items()}
    for name, value in med.items():
        print(f"[{label}] decode step, {args.rows} rows, prefix {prefix}: {name:<26} {value:8.3f} ms  ({value / med['unsteered']:.3f}x unsteered; target <= 1.03)", flush=True)
    return dict(device=label, rows=args.rows, prefix=prefix, median_ms=med, ratio={k: v / med["unsteered"] for k, v in med.items()})


def attention_inputs(B: int, Tq: int, Tkv: int, device: str, dtype: torch.dtype, users: int = 33, k: int = 2) -> dict:
    """The default model's attention shapes (H 9, Hkv 3, hd 64, d 576) with random tables."""
    g = torch.Generator().manual_seed(0)
    H, Hkv, hd, d = 9, 3, 64, 576
    basis = torch.linalg.qr(torch.randn(users, d, k, generator=g)).Q.transpose(1, 2).contiguous()
    data = dict(q=torch.randn(B, H, Tq, hd, generator=g), k=torch.randn(B, Hkv, Tkv, hd, generator=g),
                v=torch.randn(B, Hkv, Tkv, hd, generator=g), w=torch.randn(d, H * hd, generator=g) / 24,
                table=torch.randn(users, d, generator=g), basis=basis, strength=torch.ones(users),
                idx=torch.randint(0, users, (B,), generator=g), none=torch.full((B,), -1, dtype=torch.long))
    return {name: t.to(device=device, dtype=dtype if name in ("q", "k", "v", "w") else t.dtype) for name, t in data.items()}


def attention_cases(data: dict, impl) -> dict:
    """name -> zero-argument call: the fused op unsteered/steered and the composition it replaces."""
    from repedit.kernels import reference as ref

    q, k, v, w, idx = data["q"], data["k"], data["v"], data["w"], data["idx"]
    causal = q.shape[2] > 1

    def composition(project: bool):
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        y = torch.nn.functional.linear(z.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1), w)
        if project:
            return ref.project_edit(y, idx, data["basis"], data["strength"], data["table"])
        return ref.gather_add(y, idx, data["table"])

    return {
        "fused, unsteered (idx -1)": lambda: impl(q, k, v, w, None, data["none"], causal=causal, table=data["table"]),
        "fused, add": lambda: impl(q, k, v, w, None, idx, causal=causal, table=data["table"]),
        "fused, project k=2 + add": lambda: impl(q, k, v, w, None, idx, causal=causal, basis=data["basis"], strength=data["strength"], table=data["table"]),
        "SDPA + o_proj (no edit)": lambda: torch.nn.functional.linear(
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1), w),
        "SDPA + o_proj + gather_add": lambda: composition(False),
        "SDPA + o_proj + project_edit": lambda: composition(True),
    }


ATTENTION_SHAPES = (("decode 32x1, 256 keys", (32, 1, 256)), ("prefill 8x128", (8, 128, 128)))


def attention_half(args, device: str, label: str) -> list[dict]:
    """Fused attention + edit: µs per call of each case (CPU: the reference, median of rounds; CUDA: Triton, do_bench)."""
    from repedit.kernels import attention as attention_reference

    rows = []
    cuda = device == "cuda"
    impl = kernels.attention_edit if cuda else attention_reference.attention_edit
    if not cuda:
        print("fused attention: the Triton kernel's figures need a GPU; timing the pure-torch reference on CPU", flush=True)
    for shape, (B, Tq, Tkv) in ATTENTION_SHAPES:
        data = attention_inputs(B, Tq, Tkv, device, torch.bfloat16 if cuda else torch.float32)
        times = {}
        for name, fn in attention_cases(data, impl).items():
            if cuda:
                from triton.testing import do_bench

                times[name] = do_bench(fn) * 1e3
            else:
                fn()
                calls = max(1, int(args.budget_ms / max(_once_us(fn) / 1e3, 1e-3)))
                times[name] = statistics.median(_mean_us(fn, calls) for _ in range(args.repeats))
        base = times["fused, unsteered (idx -1)"]
        for name, us in times.items():
            print(f"[{label}] attention {shape:<22} {name:<30} {us:9.1f} µs  ({us / base:.3f}x fused unsteered)", flush=True)
            rows.append(dict(device=label, shape=shape, case=name, us=us, ratio_to_fused_unsteered=us / base))
    return rows


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


# ----------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-ms", type=float, default=40.0, help="time per round of each implementation (sets the calls per round)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--decode-rounds", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--cpu-attention-only", action="store_true", help="of the CPU half, only the fused-attention reference")
    parser.add_argument("--decode-smoke-on-cpu", action="store_true", help="run the decode-step part on CPU (checks the code runs; not a GPU figure)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.INTERPRET:
        raise SystemExit("TRITON_INTERPRET=1 is set: interpreter timings are not performance; unset it to benchmark")
    print(f"python {platform.python_version()}  torch {torch.__version__}  threads {args.threads}  nproc {os.cpu_count()}  "
          f"cpu {platform.processor() or platform.machine()}  {time.strftime('%Y-%m-%d %H:%M %Z')}  load {os.getloadavg()[0]:.2f}", flush=True)
    result: dict = {"threads": args.threads}
    if not args.skip_cpu:
        if not args.cpu_attention_only:
            result["cpu"] = cpu_half(args)
        result["cpu_attention"] = attention_half(args, "cpu", "CPU reference")
    if torch.cuda.is_available() and kernels.triton_available():
        name = torch.cuda.get_device_name()
        result["gpu_kernels"] = gpu_kernels(args, name)
        result["gpu_attention"] = attention_half(args, "cuda", name)
        result["gpu_decode"] = decode_steps(args, "cuda", torch.bfloat16, name)
    else:
        reason = "no CUDA device" if not torch.cuda.is_available() else f"triton unavailable ({kernels.TRITON_IMPORT_ERROR})"
        print(f"GPU half: not measured ({reason})")
        if args.decode_smoke_on_cpu:
            result["decode_smoke_cpu"] = decode_steps(args, "cpu", torch.float32, "CPU smoke run, not a GPU figure")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
