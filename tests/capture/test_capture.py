"""capture() against real oracles: Hugging Face ``output_hidden_states`` of each text run alone.

Every architecture the adapters support is covered with a tiny random model (fp32). The residual
decomposition test is an independent check that ``attn_out``/``mlp_out`` hook the tensors actually
added to the residual stream (including Gemma 2/3 post-norms and GPT-NeoX's parallel residual).
"""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from conftest import ARCHS, HIDDEN, N_LAYERS, build_tiny_model

import repedit
from repedit import Activations, capture, get_adapter, model_fingerprint

capture_module = importlib.import_module("repedit.capture.activations")  # `repedit.capture` is shadowed by the function

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
    "Hello",
    "Paris is the capital of France.",
    "I like cats and dogs",
    "One two three four five six seven eight nine ten eleven twelve",
]
ATOL = 1e-4


def hf_hidden_states(model, tokenizer, text: str) -> tuple[torch.Tensor, ...]:
    """Oracle: HF hidden states of ``text`` run alone (no padding), each ``[seq, d]``."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def hook_state(model: torch.nn.Module) -> dict[str, tuple]:
    """Every module's registered forward/pre-forward hooks (ids), to check nothing is left behind."""
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._forward_hooks_with_kwargs),
               tuple(m._forward_pre_hooks_with_kwargs))
        for name, m in model.named_modules()
    }


# --------------------------------------------------------------------------------------------------
# Agreement with Hugging Face hidden states


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_all_positions_match_hf_each_text_alone(tiny_model, tokenizer, arch, padding_side):
    model = tiny_model(arch)
    n = N_LAYERS
    acts = capture(model, tokenizer, TEXTS, sites=["resid_pre", "resid_post"], position="all",
                   padding_side=padding_side, batch_size=len(TEXTS), progress=False)
    assert acts.n_items == len(TEXTS)
    for i, text in enumerate(TEXTS):
        hidden = hf_hidden_states(model, tokenizer, text)
        assert int(acts.n_tokens[i]) == hidden[0].shape[0]
        for layer in range(n):
            assert max_diff(acts.item(f"resid_pre.{layer}", i), hidden[layer]) <= ATOL, (text, layer)
        for layer in range(n - 1):
            assert max_diff(acts.item(f"resid_post.{layer}", i), hidden[layer + 1]) <= ATOL, (text, layer)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_last_and_mean_match_hf(tiny_model, tokenizer, arch, padding_side):
    model = tiny_model(arch)
    sites = [f"resid_post.{layer}" for layer in range(N_LAYERS - 1)]
    last = capture(model, tokenizer, TEXTS, sites=sites, position="last", padding_side=padding_side, progress=False)
    mean = capture(model, tokenizer, TEXTS, sites=sites, position="mean", padding_side=padding_side, progress=False)
    for i, text in enumerate(TEXTS):
        hidden = hf_hidden_states(model, tokenizer, text)
        for layer in range(N_LAYERS - 1):
            site = f"resid_post.{layer}"
            assert last[site].shape == mean[site].shape == (len(TEXTS), HIDDEN)
            assert max_diff(last[site][i], hidden[layer + 1][-1]) <= ATOL
            assert max_diff(mean[site][i], hidden[layer + 1].mean(0)) <= ATOL
    assert torch.equal(last.n_tokens, torch.ones(len(TEXTS), dtype=torch.long))


@pytest.mark.parametrize("arch", ARCHS)
def test_last_layer_convention_final_norm(tiny_model, tokenizer, arch):
    """HF's hidden_states[-1] is the final-norm output; resid_post.{n-1} is the raw block output."""
    model = tiny_model(arch)
    adapter = get_adapter(model)
    n = adapter.n_layers
    acts = capture(model, tokenizer, TEXTS[:3], sites=[f"resid_post.{n - 1}"], position="all", padding_side="left", progress=False)
    for i, text in enumerate(TEXTS[:3]):
        hidden = hf_hidden_states(model, tokenizer, text)
        raw = acts.item(f"resid_post.{n - 1}", i)
        with torch.no_grad():
            normed = adapter.final_norm(raw)
        assert max_diff(normed, hidden[-1]) <= ATOL
        assert max_diff(raw, hidden[-1]) > 1e-2  # the raw output is really not normed


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_decomposition(tiny_model, tokenizer, arch):
    """resid_post.L == resid_pre.L + attn_out.L + mlp_out.L, and attn_out is what is added before the MLP."""
    model = tiny_model(arch)
    adapter = get_adapter(model)
    acts = capture(model, tokenizer, TEXTS, sites=["resid_pre", "resid_post", "attn_out", "mlp_out"], position="all",
                   padding_side="left", batch_size=3, progress=False)
    for layer in range(N_LAYERS):
        pre, post = acts[f"resid_pre.{layer}"], acts[f"resid_post.{layer}"]
        attn, mlp = acts[f"attn_out.{layer}"], acts[f"mlp_out.{layer}"]
        assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3  # both terms are non-trivial
        assert max_diff(pre + attn + mlp, post) <= ATOL, layer

    # Independent of repedit's hooks: the input of the pre-MLP norm, read with a plain torch hook on a
    # single unpadded text, is resid_pre + attn_out for a sequential block and resid_pre for a
    # parallel-residual block (GPT-NeoX use_parallel_residual=True).
    parallel = bool(getattr(model.config, "use_parallel_residual", False))
    text = TEXTS[0]
    seen: dict[int, torch.Tensor] = {}
    handles = [
        adapter.pre_mlp_norm(layer).register_forward_pre_hook(lambda mod, args, layer=layer: seen.__setitem__(layer, args[0][0].clone()))
        for layer in range(N_LAYERS)
    ]
    try:
        hidden = hf_hidden_states(model, tokenizer, text)
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(N_LAYERS):
        expected = hidden[layer] if parallel else hidden[layer] + acts.item(f"attn_out.{layer}", 0)
        assert max_diff(seen[layer], expected) <= ATOL, layer
        if layer < N_LAYERS - 1:  # and the MLP adds the rest
            assert max_diff(seen[layer] + (acts.item(f"attn_out.{layer}", 0) if parallel else 0) + acts.item(f"mlp_out.{layer}", 0),
                            hidden[layer + 1]) <= ATOL


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_shorter_than_texts(tokenizer, arch, padding_side):
    """A sliding window of 4 tokens (shorter than most texts) still matches each text run alone."""
    from conftest import make_config
    from transformers import AutoModelForCausalLM

    config = make_config(arch)
    config.sliding_window = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    acts = capture(model, tokenizer, TEXTS, sites=["resid_post.0", "resid_post.1"], position="all",
                   padding_side=padding_side, progress=False)
    full_window = build_tiny_model(arch)  # same seed and weights, window larger than the texts
    for i, text in enumerate(TEXTS):
        hidden = hf_hidden_states(model, tokenizer, text)
        for layer in (0, 1):
            assert max_diff(acts.item(f"resid_post.{layer}", i), hidden[layer + 1]) <= ATOL
    # the window really is in effect: the longest text differs from the full-window model
    assert max_diff(hf_hidden_states(full_window, tokenizer, TEXTS[0])[1], hf_hidden_states(model, tokenizer, TEXTS[0])[1]) > 1e-2


# --------------------------------------------------------------------------------------------------
# Batch independence


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("position", ["all", "last", "mean"])
def test_batch_independence(tiny_model, tokenizer, arch, position):
    model = tiny_model(arch)
    target = "Paris is the capital of France."
    sites = ["resid_post.0", "resid_post.1", "attn_out.1", "mlp_out.2"]
    alone = capture(model, tokenizer, [target], sites=sites, position=position, batch_size=1, progress=False)
    contexts = [
        ([TEXTS[1], target, TEXTS[0]], 3, "left"),
        ([TEXTS[0], TEXTS[4], target, TEXTS[1]], 2, "right"),
        ([target, TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[3]], 5, "left"),
        ([TEXTS[4], target], 1, "right"),
    ]
    for texts, batch_size, side in contexts:
        acts = capture(model, tokenizer, texts, sites=sites, position=position, batch_size=batch_size,
                       padding_side=side, progress=False)
        index = texts.index(target)
        for site in sites:
            assert max_diff(acts.item(site, index), alone.item(site, 0)) <= 1e-5, (site, batch_size, side)


# --------------------------------------------------------------------------------------------------
# (prompt, response) pairs


PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Say hi", "Hi there!"),
    ("Count to five, please, slowly and clearly.", "One, two, three, four, five."),
]


def _response_token_range(tokenizer, prompt: str, response: str) -> tuple[list[int], int, int]:
    """Oracle from the chat template alone: full ids and the [lo, hi) range of the response tokens."""
    prefix = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
    ids = tokenizer(full, add_special_tokens=False).input_ids
    lo = len(tokenizer(prefix, add_special_tokens=False).input_ids)
    hi = lo + len(tokenizer(response, add_special_tokens=False).input_ids)
    assert tokenizer.decode(ids[lo:hi]) == response  # the oracle range is right
    return ids, lo, hi


def test_response_span_keeps_exactly_the_response_tokens(tiny_model, tokenizer):
    model = tiny_model("llama")
    acts = capture(model, tokenizer, PAIRS, sites=["resid_post.0", "resid_post.1"], position="all", span="response",
                   padding_side="left", batch_size=2, progress=False)
    last = capture(model, tokenizer, PAIRS, sites=["resid_post.1"], position="last", span="response", progress=False)
    mean = capture(model, tokenizer, [{"prompt": p, "response": r} for p, r in PAIRS], sites=["resid_post.1"],
                   position="mean", span="response", progress=False)
    for i, (prompt, response) in enumerate(PAIRS):
        ids, lo, hi = _response_token_range(tokenizer, prompt, response)
        encoded = repedit.model.inputs.encode(tokenizer, [(prompt, response)])[0]
        assert encoded.input_ids == ids
        assert encoded.response_span == (lo, hi)
        assert tokenizer.decode(encoded.input_ids[slice(*encoded.response_span)]) == response
        assert int(acts.n_tokens[i]) == hi - lo
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in (0, 1):
            assert max_diff(acts.item(f"resid_post.{layer}", i), hidden[layer + 1][0, lo:hi]) <= ATOL
        assert max_diff(last["resid_post.1"][i], hidden[2][0, hi - 1]) <= ATOL
        assert max_diff(mean["resid_post.1"][i], hidden[2][0, lo:hi].mean(0)) <= ATOL


def test_response_span_without_chat_template(tiny_model, tokenizer):
    """Without a chat template the pair is prompt + newline + response; the span covers the response only."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    model = tiny_model("gpt2")
    acts = capture(model, plain, PAIRS, sites=["resid_post.1"], position="all", span="response", progress=False)
    for i, (prompt, response) in enumerate(PAIRS):
        full_ids = plain(prompt + "\n" + response).input_ids
        n_resp = len(plain(response).input_ids)
        assert plain.decode(full_ids[-n_resp:]) == response
        encoded = repedit.model.inputs.encode(plain, [(prompt, response)])[0]
        assert encoded.input_ids == full_ids
        assert encoded.response_span == (len(full_ids) - n_resp, len(full_ids))
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([full_ids]), output_hidden_states=True).hidden_states
        assert max_diff(acts.item("resid_post.1", i), hidden[2][0, -n_resp:]) <= ATOL


# --------------------------------------------------------------------------------------------------
# Hooks are always removed


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_hooks_removed_after_capture(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    before = hook_state(model)
    capture(model, tokenizer, TEXTS, sites=["resid_pre", "resid_post", "attn_out", "mlp_out"], position="last", batch_size=2, progress=False)
    assert hook_state(model) == before
    capture(model, tokenizer, TEXTS, sites=["resid_post.0"], position="all", progress=False)  # stops early
    assert hook_state(model) == before


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_hooks_removed_when_forward_raises(tiny_model, tokenizer, arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    calls = {"n": 0}

    def boom(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:  # fail in the second batch, after a successful one
            raise RuntimeError("boom inside the model")

    handle = adapter.block(0).register_forward_hook(boom)
    try:
        before = hook_state(model)
        with pytest.raises(RuntimeError, match="boom inside the model"):
            capture(model, tokenizer, TEXTS, sites=["resid_pre", "resid_post", "attn_out", "mlp_out"], position="all",
                    batch_size=2, progress=False)
        assert calls["n"] == 2
        assert hook_state(model) == before
    finally:
        handle.remove()


def test_hooks_removed_when_input_fails_inside_model(tokenizer):
    """Token ids beyond the embedding table make the embedding lookup fail inside the forward pass."""
    from conftest import make_config
    from transformers import AutoModelForCausalLM

    config = make_config("llama")
    config.vocab_size = 100
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    before = hook_state(model)
    with pytest.raises(IndexError):
        capture(model, tokenizer, ["these token ids are far above one hundred"], sites=["resid_post", "attn_out.1"], progress=False)
    assert hook_state(model) == before


# --------------------------------------------------------------------------------------------------
# Streaming to disk, lazy loading, save/load, resume

STREAM_TEXTS = [f"Sentence number {i}: " + " ".join(["word"] * (i % 4 + 1)) + f" and {'more ' * (i % 3)}end." for i in range(10)]
STREAM_SITES = ["resid_pre.1", "resid_post.0", "resid_post.2", "attn_out.1", "mlp_out.2"]


def _assert_same_acts(a: Activations, b: Activations, atol: float = 1e-5) -> None:
    assert a.sites == b.sites
    assert torch.equal(a.n_tokens, b.n_tokens)
    for site in a.sites:
        assert max_diff(a[site], b[site]) <= atol, site


@pytest.mark.parametrize("position", ["all", "last"])
def test_streaming_equals_in_memory(tiny_model, tokenizer, tmp_path, position):
    model = tiny_model("llama")
    memory = capture(model, tokenizer, STREAM_TEXTS, sites=STREAM_SITES, position=position, batch_size=2, progress=False)
    streamed = capture(model, tokenizer, STREAM_TEXTS, sites=STREAM_SITES, position=position, batch_size=2,
                       out_dir=tmp_path / "acts", shard_size=3, progress=False)
    shards = sorted(p.name for p in (tmp_path / "acts").glob("shard-*.safetensors"))
    assert shards == [f"shard-{i:05d}.safetensors" for i in range(4)]  # 3 + 3 + 3 + 1 items
    manifest = json.loads((tmp_path / "acts" / "activations.json").read_text())
    assert manifest["complete"] is True and [s["n_items"] for s in manifest["shards"]] == [3, 3, 3, 1]
    _assert_same_acts(memory, streamed)
    # and against the oracle, item by item (items of the first and of the last shard)
    for i in (0, 7, 9):
        hidden = hf_hidden_states(model, tokenizer, STREAM_TEXTS[i])
        if position == "all":
            got, expected = streamed.item("resid_post.0", i), hidden[1]
        else:
            got, expected = streamed["resid_post.0"][i], hidden[1][-1]
        assert max_diff(got, expected) <= ATOL


def test_load_is_lazy(tiny_model, tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama")
    capture(model, tokenizer, STREAM_TEXTS, sites=STREAM_SITES, position="all", out_dir=tmp_path / "acts", shard_size=3, progress=False)
    read: list[str] = []
    real_read_tensor = capture_module.read_tensor  # reads one named tensor of a shard (safetensors' lazy safe_open)

    def spy(path, name):
        read.append(name)
        return real_read_tensor(path, name)

    monkeypatch.setattr(capture_module, "read_tensor", spy)
    acts = Activations.load(tmp_path / "acts")
    assert set(read) <= {"__n_tokens__"}  # opening reads only the per-item token counts
    assert acts._tensors == {}
    read.clear()
    tensor = acts["resid_post.2"]
    assert read == ["resid_post.2"] * 4  # one site, from each of the 4 shards, nothing else
    assert tensor.shape == (int(acts.n_tokens.sum()), HIDDEN)


def test_save_load_round_trip(tiny_model, tokenizer, tmp_path):
    model = tiny_model("gpt2")
    metadata = [{"label": i % 2, "user": f"u{i}"} for i in range(len(STREAM_TEXTS))]
    acts = capture(model, tokenizer, STREAM_TEXTS, sites=STREAM_SITES, position="all", span=(1, -1), metadata=metadata, progress=False)
    acts.save(tmp_path / "saved")
    loaded = Activations.load(tmp_path / "saved")
    assert loaded.position == "all" and loaded.span == (1, -1) and loaded.d_model == 64
    assert loaded.metadata == metadata
    assert loaded.model_fingerprint == acts.model_fingerprint == model_fingerprint(model)
    assert loaded.model_name == acts.model_name
    for site in acts.sites:
        assert torch.equal(loaded[site], acts[site])
    assert torch.equal(loaded.n_tokens, acts.n_tokens)
    for i in (0, 5):
        assert torch.equal(loaded.item("mlp_out.2", i), acts.item("mlp_out.2", i))


def test_resume_after_interruption(tiny_model, tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    out = tmp_path / "acts"
    kwargs = dict(sites=STREAM_SITES, position="all", batch_size=2, progress=False)
    memory = capture(model, tokenizer, STREAM_TEXTS, **kwargs)

    real_save = capture_module.save_tensors
    saved = {"n": 0}

    def save_then_crash(path, tensors, *args, **kw):
        if saved["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        saved["n"] += 1
        return real_save(path, tensors, *args, **kw)

    monkeypatch.setattr(capture_module, "save_tensors", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        capture(model, tokenizer, STREAM_TEXTS, out_dir=out, shard_size=3, **kwargs)
    monkeypatch.setattr(capture_module, "save_tensors", real_save)

    manifest = json.loads((out / "activations.json").read_text())
    assert manifest["complete"] is False and len(manifest["shards"]) == 2
    with pytest.raises(repedit.InputError, match="incomplete"):
        Activations.load(out)
    first_shards = {name: (out / name).read_bytes() for name in ("shard-00000.safetensors", "shard-00001.safetensors")}

    rows = {"n": 0}
    handle = adapter.embed.register_forward_hook(lambda mod, args, output: rows.__setitem__("n", rows["n"] + args[0].shape[0]))
    try:
        resumed = capture(model, tokenizer, STREAM_TEXTS, out_dir=out, shard_size=3, **kwargs)
    finally:
        handle.remove()
    assert rows["n"] == 4  # only the items of the last two shards (3 + 1) were run again
    for name, content in first_shards.items():
        assert (out / name).read_bytes() == content
    assert resumed.n_items == len(STREAM_TEXTS)
    _assert_same_acts(memory, resumed)

    # a complete capture run again with the same inputs and settings computes nothing
    rows["n"] = 0
    handle = adapter.embed.register_forward_hook(lambda mod, args, output: rows.__setitem__("n", rows["n"] + args[0].shape[0]))
    try:
        again = capture(model, tokenizer, STREAM_TEXTS, out_dir=out, shard_size=3, **kwargs)
    finally:
        handle.remove()
    assert rows["n"] == 0
    _assert_same_acts(memory, again)


def test_out_dir_with_other_settings_is_replaced(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "acts"
    capture(model, tokenizer, STREAM_TEXTS, sites=["resid_post.0"], position="last", out_dir=out, shard_size=3, progress=False)
    with pytest.warns(UserWarning, match="replaced"):
        acts = capture(model, tokenizer, STREAM_TEXTS[:4], sites=["resid_post.1"], position="last", out_dir=out, shard_size=3, progress=False)
    assert acts.sites == ["resid_post.1"] and acts.n_items == 4
    hidden = hf_hidden_states(model, tokenizer, STREAM_TEXTS[3])
    assert max_diff(acts["resid_post.1"][3], hidden[2][-1]) <= ATOL


# --------------------------------------------------------------------------------------------------
# Metadata and model fingerprint


def test_metadata_and_fingerprint_stored_and_loaded(tiny_model, tokenizer, tmp_path):
    model = tiny_model("qwen2")
    metadata = [{"label": i, "tags": ["a", str(i)]} for i in range(len(STREAM_TEXTS))]
    memory = capture(model, tokenizer, STREAM_TEXTS, sites=["resid_post.1"], metadata=metadata, progress=False)
    streamed = capture(model, tokenizer, STREAM_TEXTS, sites=["resid_post.1"], metadata=metadata,
                       out_dir=tmp_path / "acts", shard_size=4, progress=False)
    reloaded = Activations.load(tmp_path / "acts")
    for acts in (memory, streamed, reloaded):
        assert acts.metadata == metadata
        assert acts.model_fingerprint == model_fingerprint(model)
        assert acts.model_fingerprint.startswith("qwen2-")
    manifest = json.loads((tmp_path / "acts" / "activations.json").read_text())
    assert manifest["metadata"] == metadata and manifest["model_fingerprint"] == model_fingerprint(model)
    no_meta = capture(model, tokenizer, STREAM_TEXTS[:2], sites=["resid_post.1"], progress=False)
    assert no_meta.metadata == [{}, {}]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fingerprint_stable_and_discriminating(tiny_model, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    fingerprint = model_fingerprint(model)
    assert fingerprint == model_fingerprint(model)

    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert model_fingerprint(reloaded) == fingerprint

    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fingerprint

    assert model_fingerprint(build_tiny_model(arch, seed=1)) != fingerprint  # other random weights
    changed = copy.deepcopy(model)
    with torch.no_grad():
        mlp_weight = next(p for name, p in changed.named_parameters() if ".1." in name and "mlp" in name and p.dim() == 2)
        mlp_weight.copy_(torch.randn_like(mlp_weight))
    assert model_fingerprint(changed) != fingerprint  # one weight tensor replaced
