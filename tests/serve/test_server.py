"""The OpenAI-compatible server: real HTTP on loopback (uvicorn in a thread, httpx and the openai client).

Oracle for every generated text: offline generation (``repedit.model.generation.generate_chat``) with the
user's edit applied through ``edit.apply(model)`` — a different code path (``model.generate``) from
the server's own decode loop. Offline outputs are computed while the server is idle, because
steering hooks are model-wide.
"""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import HIDDEN, build_tiny_model

import repedit
from repedit.io import InputError
from repedit.model.generation import GenerationSettings, generate_chat, render_chat
from repedit.serve import (
    BackgroundServer,
    Done,
    Engine,
    EngineClosed,
    Failed,
    GenerationRequest,
    Limits,
    SamplingParams,
    ServerConfig,
    TextAssembler,
    Tokens,
    create_app,
    read_tokens,
)
from repedit.steering import SiteEdit, UserEdit, steer
from repedit.store import save_edits

PROMPTS = ["How can I sleep better?", "Suggest a weekend activity.", "Explain compound interest.", "What is a good breakfast?",
           "Tell me a joke.", "Write a haiku about rain.", "How do plants grow?", "Give me a tip for learning Python."]
NAME = "tiny"


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def offline(model, tokenizer, prompts, edit, max_tokens, **settings) -> list[str]:
    """The oracle: offline batched generation of ``prompts`` with ``edit`` (or unsteered)."""
    gen = GenerationSettings(max_new_tokens=max_tokens, batch_size=len(prompts), **settings)
    with (edit.apply(model) if edit is not None else contextlib.nullcontext()):
        return [g.text for g in generate_chat(model, tokenizer, [chat(p) for p in prompts], gen, progress=False)]


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Wait until every submitted request has ended and the batch is empty (its hooks are off the model)."""
    deadline = time.monotonic() + timeout
    while (stats := engine.stats())["in_flight"] or stats["running"]:
        assert time.monotonic() < deadline, "the engine did not become idle"
        time.sleep(0.01)


def body(prompt: str, user: str | None = None, max_tokens: int = 8, **extra) -> dict:
    out = {"model": NAME, "messages": chat(prompt), "max_tokens": max_tokens, "temperature": 0, **extra}
    if user is not None:
        out["user"] = user
    return out


def sse_text(response: httpx.Response) -> tuple[str, list[dict]]:
    """Concatenated content deltas and all decoded SSE events of a streamed response."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    return text, events


# ----------------------------------------------------------------- tiny-model server

@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """A tiny llama with a store of three users (+ one whose edit overflows to inf) and a tokens file."""
    model = build_tiny_model("llama", seed=3)
    fp = repedit.model_fingerprint(model)
    torch.manual_seed(0)
    edits = {u: UserEdit(u, [SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN) * 2.0)], fp, HIDDEN) for u in ("alice", "bob", "carol")}
    # 10 x 3e38 overflows float32: this user's hidden states become inf, its logits NaN.
    edits["overflow"] = UserEdit("overflow", [SiteEdit("resid_post.0", "add", vector=torch.full((HIDDEN,), 3e38), a=10.0)], fp, HIDDEN)
    store = save_edits(edits, tmp_path_factory.mktemp("store"))
    tokens = tmp_path_factory.mktemp("auth") / "tokens.json"
    tokens.write_text(json.dumps({"tok-alice": ["alice"], "tok-all": "*"}))
    return model, tokenizer, edits, store, tokens


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer, edits, store, tokens = tiny
    config = ServerConfig(NAME, Limits(max_body_bytes=20_000, max_tokens=64, default_max_tokens=8), read_tokens(tokens), max_batch_size=8, batch_window=0.05)
    app = create_app(model, tokenizer, store, config)
    with BackgroundServer(app) as running:
        running.engine = app.state.engine
        yield running


def client(server, token: str | None = "tok-all") -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60, limits=httpx.Limits(max_connections=64))


def test_health_and_models(server):
    with client(server) as c:
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["model"] == NAME
        listed = c.get("/v1/models").json()
        assert [m["id"] for m in listed["data"]] == [NAME]
        assert c.get(f"/v1/models/{NAME}").json()["id"] == NAME
        assert c.get("/v1/models/other").status_code == 404
    with client(server, token=None) as anonymous:
        assert anonymous.get("/health").status_code == 200  # health needs no token
        assert anonymous.get("/v1/models").status_code == 401


def test_concurrent_users_match_offline_and_share_batches(server, tiny):
    """Requests of several users (and unsteered ones) at once, some streamed: each equals offline."""
    model, tokenizer, edits, _, _ = tiny
    users = ["alice", "bob", "carol", None]
    expected = {u: offline(model, tokenizer, PROMPTS, edits[u] if u else None, 10) for u in users}
    assert sum(expected[u] != expected[None] for u in users[:3]) >= 2  # the edits change the answers
    jobs = [(u, i, i % 3 == 0) for u in users for i in range(len(PROMPTS))]
    before = server.engine.stats()

    def send(job):
        user, i, stream = job
        with client(server) as c:
            if stream:
                with c.stream("POST", "/v1/chat/completions", json=body(PROMPTS[i], user, 10, stream=True)) as r:
                    assert r.status_code == 200
                    return sse_text(r)[0]
            r = c.post("/v1/chat/completions", json=body(PROMPTS[i], user, 10))
            assert r.status_code == 200, r.text
            assert r.headers["x-repedit-steered"] == ("true" if user else "false")
            return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    for (user, i, stream), answer in zip(jobs, answers):
        assert answer == expected[user][i], f"user {user}, prompt {i}, stream {stream}"
    after = server.engine.stats()
    assert after["peak_batch"] >= 4  # batched together, not one request at a time
    assert after["steps"] - before["steps"] < len(jobs) * 10  # fewer forwards than one request at a time


def _collector(n: int):
    """Per-request token lists, end events, and ``listener(i)`` making request i's ``on_event``."""
    results: list[list[int]] = [[] for _ in range(n)]
    ends: list = [None] * n

    def listener(i):
        def on_event(event):
            if isinstance(event, Tokens):
                results[i].extend(event.ids)
            else:
                ends[i] = event
        return on_event

    return results, ends, listener


def test_engine_admits_requests_into_a_running_batch(tiny):
    """Continuous batching: requests that arrive while others decode join them; outputs = offline."""
    model, tokenizer, edits, _, _ = tiny
    fp = repedit.model_fingerprint(model)
    torch.manual_seed(5)
    edits = {**edits,  # position rules too: the edit on generated tokens only, or from token 20 on
             "gen": UserEdit("gen", [SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN) * 3)], fp, HIDDEN, positions="generated"),
             "from20": UserEdit("from20", [SiteEdit("resid_post.0", "add", vector=torch.randn(HIDDEN) * 3)], fp, HIDDEN, positions=20)}
    plan = [(PROMPTS[i], ["alice", "gen", None, "from20"][i % 4]) for i in range(8)]
    expected = [offline(model, tokenizer, [p], edits[u] if u else None, 16)[0] for p, u in plan]
    engine = Engine(model, tokenizer, max_batch_size=3, batch_window=0.0).start()
    results, ends, listener = _collector(len(plan))

    try:
        for i, (prompt, user) in enumerate(plan):
            engine.submit(GenerationRequest(render_chat(tokenizer, chat(prompt)), edits[user] if user else None, SamplingParams(max_tokens=16 - (i % 4)), listener(i)))
            time.sleep(0.003 * (i % 3))
        wait_idle(engine)
    finally:
        engine.close()
    assert engine.counts["joined_running_batch"] > 0 and engine.counts["peak_batch"] <= 3
    for i, (prompt, user) in enumerate(plan):
        assert isinstance(ends[i], Done)
        text = tokenizer.decode(results[i], skip_special_tokens=True).strip()
        assert expected[i].startswith(text) and len(results[i]) == ends[i].completion_tokens
        if ends[i].reason == "length":
            assert len(results[i]) == 16 - (i % 4)
    full = [i for i in range(len(plan)) if i % 4 == 0]
    assert all(tokenizer.decode(results[i], skip_special_tokens=True).strip() == expected[i] for i in full)


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps_and_equal_offline(tiny):
    """Prompts longer than prefill_chunk are fed in chunks (their own cache) while short requests decode;
    every output equals offline generation, for every position rule (the prompt length is the whole
    prompt's, not the first chunk's)."""
    model, tokenizer, edits, _, _ = tiny
    fp = repedit.model_fingerprint(model)
    torch.manual_seed(6)
    edits = {**edits, **{rule: UserEdit(rule, [SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN) * 3)], fp, HIDDEN, positions=position)
                         for rule, position in (("gen", "generated"), ("prompt", "prompt"), ("from50", 50))}}
    long_prompt = "Please answer carefully. " * 24
    plan = [(long_prompt + PROMPTS[i] if i % 2 == 0 else PROMPTS[i], ["alice", "gen", "prompt", None, "from50", "bob"][i % 6]) for i in range(8)]
    lengths = [len(render_chat(tokenizer, chat(p))) for p, _ in plan]
    assert min(lengths[0::2]) > 3 * 40 and max(lengths[1::2]) <= 40  # long ones take 4+ chunks, short ones none
    expected = [offline(model, tokenizer, [p], edits[u] if u else None, 12)[0] for p, u in plan]
    engine = Engine(model, tokenizer, max_batch_size=8, batch_window=0.0, prefill_chunk=40, long_prefill_share=0.5).start()
    results, ends, listener = _collector(len(plan))

    try:
        for i, (prompt, user) in enumerate(plan):
            engine.submit(GenerationRequest(render_chat(tokenizer, chat(prompt)), edits[user] if user else None, SamplingParams(max_tokens=12), listener(i)))
        wait_idle(engine)
    finally:
        engine.close()
    assert engine.counts["prefill_chunks"] >= 4 * 4 and engine.counts["prefills"] >= 5
    for i in range(len(plan)):
        assert isinstance(ends[i], Done), ends[i]
        assert tokenizer.decode(results[i], skip_special_tokens=True).strip() == expected[i], (i, plan[i][1])


def test_prompt_lengths_make_chunked_steering_equal_whole_prompt_steering(tiny):
    """steer(prompt_lengths=...): a prompt fed in three forwards gets the same "prompt"/"generated" edits
    as in one forward (oracle: the hidden states of the one-forward run)."""
    from transformers import DynamicCache

    model, tokenizer, _, _, _ = tiny
    fp = repedit.model_fingerprint(model)
    torch.manual_seed(7)
    ids = torch.randint(5, 500, (1, 30))
    for rule in ("prompt", "generated", 10):
        edit = UserEdit("u", [SiteEdit("resid_post.0", "add", vector=torch.randn(HIDDEN))], fp, HIDDEN, positions=rule)
        with torch.no_grad(), steer(model, [edit], [0]):
            whole = model(input_ids=ids[:, :24], attention_mask=torch.ones(1, 24, dtype=torch.long)).logits
        cache, parts = DynamicCache(config=model.config), []
        with torch.no_grad():
            for start, end in ((0, 8), (8, 16), (16, 24)):
                with steer(model, [edit], [0], prompt_lengths=[24]):
                    parts.append(model(input_ids=ids[:, start:end], attention_mask=torch.ones(1, end, dtype=torch.long),
                                       position_ids=torch.arange(start, end)[None], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5, msg=f"positions={rule!r}")


def test_sliding_window_model_falls_back_to_whole_batches(tokenizer):
    """Gemma 2 has sliding-window layers: no cache merging, but the same outputs as offline."""
    model = build_tiny_model("gemma2", seed=1)
    fp = repedit.model_fingerprint(model)
    edit = UserEdit("g", [SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN) * 3)], fp, HIDDEN)
    expected = offline(model, tokenizer, PROMPTS[:4], edit, 6)
    engine = Engine(model, tokenizer, max_batch_size=8, batch_window=0.0).start()
    got: list[list[int]] = [[] for _ in range(4)]
    try:
        for i in range(4):
            engine.submit(GenerationRequest(render_chat(tokenizer, chat(PROMPTS[i])), edit, SamplingParams(max_tokens=6),
                                            lambda e, i=i: got[i].extend(e.ids) if isinstance(e, Tokens) else None))
            time.sleep(0.01)
        wait_idle(engine)
    finally:
        engine.close()
    assert engine._continuous is False and engine.counts["joined_running_batch"] == 0
    assert [tokenizer.decode(g, skip_special_tokens=True).strip() for g in got] == expected


def test_auth_token_cannot_steer_as_another_user(server):
    with client(server, "tok-alice") as c:
        assert c.post("/v1/chat/completions", json=body("Hi", "alice")).status_code == 200
        refused = c.post("/v1/chat/completions", json=body("Hi", "bob"))
        assert refused.status_code == 403 and "bob" in refused.json()["error"]["message"]
        # the header route is checked the same way, and a body/header mismatch is refused
        assert c.post("/v1/chat/completions", json=body("Hi"), headers={"X-Repedit-User": "bob"}).status_code == 403
        assert c.post("/v1/chat/completions", json=body("Hi", "alice"), headers={"X-Repedit-User": "bob"}).status_code == 400
        # an unknown user is still another user: 403 before 404, also with the unsteered fallback
        assert c.post("/v1/chat/completions", json=body("Hi", "nobody", unknown_user="unsteered")).status_code == 403
        unsteered = c.post("/v1/chat/completions", json=body("Hi"))
        assert unsteered.status_code == 200 and unsteered.headers["x-repedit-steered"] == "false"
    with client(server, None) as c:
        missing = c.post("/v1/chat/completions", json=body("Hi", "alice"))
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    with client(server, "wrong") as c:
        assert c.post("/v1/chat/completions", json=body("Hi", "alice")).status_code == 401


def test_store_changes_apply_without_a_restart(server, tiny):
    model, tokenizer, edits, store, _ = tiny
    with client(server) as c:
        assert c.post("/v1/chat/completions", json=body(PROMPTS[5], "dave")).status_code == 404
        dave = UserEdit("dave", [SiteEdit("resid_post.1", "add", vector=torch.ones(HIDDEN) * 4)], repedit.model_fingerprint(model), HIDDEN)
        save_edits({**edits, "dave": dave}, store)
        answer = c.post("/v1/chat/completions", json=body(PROMPTS[5], "dave"))
        assert answer.status_code == 200 and answer.headers["x-repedit-steered"] == "true"
    wait_idle(server.engine)
    assert answer.json()["choices"][0]["message"]["content"] == offline(model, tokenizer, [PROMPTS[5]], dave, 8)[0]


def test_unknown_user_is_404_unless_unsteered_is_asked_for(server, tiny):
    model, tokenizer, _, _, _ = tiny
    with client(server) as c:
        missing = c.post("/v1/chat/completions", json=body(PROMPTS[0], "nobody"))
        assert missing.status_code == 404
        error = missing.json()["error"]
        assert error["code"] == "user_not_found" and "nobody" in error["message"] and "unsteered" in error["message"]
        fallback = c.post("/v1/chat/completions", json=body(PROMPTS[0], "nobody", unknown_user="unsteered"))
        assert fallback.status_code == 200 and fallback.headers["x-repedit-steered"] == "false"
    wait_idle(server.engine)
    assert fallback.json()["choices"][0]["message"]["content"] == offline(model, tokenizer, [PROMPTS[0]], None, 8)[0]


@pytest.mark.parametrize("payload, status, needle", [
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "'model'"),
    ({"model": NAME}, 400, "'messages'"),
    ({"model": NAME, "messages": []}, 400, "'messages'"),
    ({"model": NAME, "messages": "hello"}, 400, "'messages'"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "text part"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "'max_tokens' must be between 1 and 64"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 65}, 400, "'max_tokens' must be between 1 and 64"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": "8"}, 400, "integer"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": True}, 400, "integer"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, 400, "'temperature' must be in [0.0, 2.0]"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": -0.1}, 400, "'temperature'"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "'top_p'"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "'n'"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "stop": [""]}, 400, "'stop'"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "user": "../etc"}, 400, "user id"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_token": 5}, 400, "unsupported field(s): max_token"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "unknown_user": "maybe"}, 400, "unknown_user"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "gpt-4o"),
    ([1, 2], 400, "JSON object"),
])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, payload, status, needle):
    with client(server) as c:
        response = c.post("/v1/chat/completions", json=payload)
        assert response.status_code == status, response.text
        assert needle in response.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json=body("Hi", "alice", 2)).status_code == 200


def _fuzz_bodies(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Deterministic malformed request bodies: a valid request with one field replaced by a hostile value,
    plus raw bodies that are not (or barely) JSON. Each comes with a label for the failure message."""
    import random
    rng = random.Random(seed)
    fields = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream", "stream_options",
              "stop", "user", "repetition_penalty", "unknown_user", "response_format", "n", "logit_bias", "tools", "metadata", "\u202eresu", "x" * 300]
    odd_text = ["alice\n", "alice\r\n", "\talice", "al\x00ice", "alice\u2028", "\uff41lice", "alice ", "\u200balice", "\ud800", "\udfff\ud800",
                "\U0001F600" * 50, "\u202egnp.exe", "a" * 129, "", " ", "\x1b[31mred", "caf\u00e9", "\ufeff", "\ue000"]

    def hostile() -> object:
        kind = rng.randrange(9)
        if kind == 0:
            depth = rng.choice([33, 1000, 9_000, 50_000])
            return json.loads("[" * 30 + "]" * 30) if depth < 33 else {"__deep__": depth}
        if kind == 1:
            return {"__digits__": rng.choice([20, 21, 65, 400, 5000])}  # written as 9...9 by encode()
        if kind == 2:
            return {"__digits__": -rng.choice([20, 65, 4400])}
        if kind == 3:
            return rng.choice([1e308, -1e308, 5e-324, -0.0, 0.5, 2.0000001, 1.7976931348623157e308])
        if kind == 4:
            return rng.choice(odd_text)
        if kind == 5:
            return rng.choice([None, True, False, [], {}, [None], {"type": "text"}, [{"role": "user"}], [[["x"]]]])
        if kind == 6:
            return [{"role": rng.choice(["user", "system", "tool", "\n"]), "content": rng.choice(odd_text + [None, 7, [{"type": "text", "text": "\ud800"}]])}]
        if kind == 7:
            return "x" * rng.choice([1, 5000, 15_000])
        return {"type": rng.choice(["text", "json_object", "\x00"]), "extra": rng.choice(odd_text)}

    def encode(value: object) -> bytes:
        """JSON text of ``value``, with markers written out: json.dumps would recurse through deep nesting,
        and Python refuses to build ints of more than 4300 digits."""
        text = json.dumps(value)  # ensure_ascii: lone surrogates travel as \ud800 escapes
        for marker, expand in (('{"__deep__": ', lambda n: "[" * n + "]" * n), ('{"__digits__": ', lambda n: "-" * (n < 0) + "9" * abs(n))):
            while marker in text:
                start = text.index(marker)
                end = text.index("}", start)
                text = text[:start] + expand(int(text[start + len(marker):end])) + text[end + 1:]
        return text.encode()

    out = []
    for i in range(count):
        base = body("Hi", rng.choice([None, "alice"]), 2)
        if i % 5 == 4:  # raw bodies
            raw = rng.choice([
                b"[" * 9_000 + b"]" * 9_000, b'{"model": "tiny", "seed": ' + b"7" * 5000 + b"}", b'{"temperature": NaN}', b'{"top_p": Infinity}',
                b'{"model": "tiny"', b"\xff\xfe{\x00}\x00", b"\xef\xbb\xbf{}", b'{"model": "\xc3\x28"}', b"null", b'"string"', b"1e999",
                b'{"model": "tiny", "model": 5}', json.dumps(base).encode("utf-16"), b'{"a": "' + b"\\u0000" * 1000 + b'"}',
                b'{"messages": [' + b'{"role": "user", "content": "x"},' * 300 + b'{}]}',
            ])
            out.append((f"raw {raw[:40]!r}", raw))
            continue
        field = rng.choice(fields)
        base[field] = hostile()
        out.append((f"{field}={str(base[field])[:40]!r}", encode(base)))
    return out


def test_fuzzed_request_bodies_never_get_a_500(server):
    """~200 hostile bodies (deep nesting, huge numbers, odd unicode, control characters in ids): every
    answer is a 2xx or a 4xx in OpenAI's error shape, and the server keeps serving correct answers."""
    bodies = _fuzz_bodies(200)
    statuses: dict[int, int] = {}
    with client(server) as c:
        for label, raw in bodies:
            response = c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:
                assert response.json()["error"]["message"], label
        assert c.post("/v1/chat/completions", json=body("Hi", "alice", 2)).status_code == 200
    assert statuses.get(200, 0) > 0 and sum(n for s, n in statuses.items() if s >= 400) > 100, statuses  # the fuzz reached both sides


@pytest.mark.parametrize("user", ["alice\n", "alice\r", "\talice", "al\x00ice", "alice\u2028", "alice\u0085", "\u200balice"])
def test_user_id_with_control_or_space_characters_is_a_400_naming_the_field(server, user):
    with client(server) as c:
        response = c.post("/v1/chat/completions", json=body("Hi", user, 2))
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "user" and "U+" in error["message"], response.text


@pytest.mark.parametrize("raw, needle", [
    # 9,000 levels fit the test server's 20 kB body limit and are 9x Python's recursion limit
    (b"[" * 9_000 + b"]" * 9_000, "deeper than 32"),
    (b'{"model": "tiny", "messages": ' + b"[" * 9_000 + b"]" * 9_000 + b"}", "deeper than 32"),
    (b'{"model": "tiny", "seed": ' + b"9" * 5000 + b"}", "number of 5000 characters"),
    (b'{"model": "tiny", "temperature": NaN}', "NaN"),
])
def test_bodies_that_would_exhaust_the_json_decoder_are_400(server, raw, needle):
    with client(server) as c:
        response = c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text[:300]


def test_body_size_bad_json_and_unknown_routes(server):
    with client(server) as c:
        big = body("x" * 30_000, "alice")
        too_big = c.post("/v1/chat/completions", json=big)
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        chunked = c.post("/v1/chat/completions", content=iter([b"{" + b" " * 15_000, b" " * 15_000 + b"}"]))  # no content-length
        assert chunked.status_code == 413
        bad = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        assert c.get("/v1/nothing").status_code == 404 and "error" in c.get("/v1/nothing").json()
        assert c.post("/v1/chat/completions", json=body("Hi", "bob", 2)).status_code == 200


def test_context_limit(server, tiny):
    context = tiny[0].config.max_position_embeddings
    with client(server) as c:
        response = c.post("/v1/chat/completions", json=body("word " * (context - 20), "alice", 64))
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_failing_request_fails_alone(server, tiny):
    """An edit that makes the logits NaN fails its own rows only (500 "non-finite" from the engine); concurrent
    requests are unaffected. Through the store, the same edit is now refused at load (422 naming the user):
    its vector holds 3e38, beyond any residual stream."""
    model, tokenizer, edits, _, _ = tiny
    expected = offline(model, tokenizer, PROMPTS[:6], edits["carol"], 8)
    jobs = [("overflow", 0)] + [("carol", i) for i in range(6)] + [("overflow", 1)]
    overflow_events: list[list] = [[], []]

    def send(job):
        if job[0] == "overflow":  # straight to the engine, past the store's checks
            events = overflow_events[job[1]]
            server.engine.submit(GenerationRequest(render_chat(tokenizer, chat(PROMPTS[job[1]])), edits["overflow"], SamplingParams(max_tokens=8), events.append))
            return None
        with client(server) as c:
            return c.post("/v1/chat/completions", json=body(PROMPTS[job[1]], job[0], 8))

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(send, jobs))
    wait_idle(server.engine)
    for events in overflow_events:
        assert isinstance(events[-1], Failed) and "non-finite" in events[-1].message
    for (user, i), response in zip(jobs, responses):
        if user != "overflow":
            assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == expected[i]
    with client(server) as c:
        refused = c.post("/v1/chat/completions", json=body(PROMPTS[0], "overflow", 8))
        assert refused.status_code == 422 and "'overflow'" in refused.json()["error"]["message"]
        assert "3e+38" in refused.json()["error"]["message"] and "/tmp" not in refused.json()["error"]["message"]  # no server path
        assert c.get("/health").json()["status"] == "ok"


def test_a_forward_that_raises_fails_only_its_requests(tiny):
    """Model errors: a prefill that raises fails only the request that breaks it (the others are
    re-admitted one by one); a decode step that raises fails its rows; the worker keeps going."""
    model, tokenizer, edits, _, _ = tiny
    poison = render_chat(tokenizer, chat("Please poison the well"))
    others = {t for p in PROMPTS[:4] for t in render_chat(tokenizer, chat(p))}
    marker = next(t for t in poison if t not in others)  # a token that only the poison prompt has
    state = {"fail_decode": False}

    def pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if (ids == marker).any() or (state["fail_decode"] and ids.shape[1] == 1):
            raise RuntimeError("injected failure")

    expected = offline(model, tokenizer, PROMPTS[:4], edits["alice"], 6)
    handle = model.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    engine = Engine(model, tokenizer, max_batch_size=8, batch_window=0.2).start()
    events: dict[int, list] = {i: [] for i in range(6)}
    try:
        prompts = [poison] + [render_chat(tokenizer, chat(p)) for p in PROMPTS[:4]]
        for i, ids in enumerate(prompts):  # all within the batch window: one prefill batch
            engine.submit(GenerationRequest(ids, edits["alice"], SamplingParams(max_tokens=6), events[i].append))
        wait_idle(engine)
        state["fail_decode"] = True
        engine.submit(GenerationRequest(prompts[1], None, SamplingParams(max_tokens=6), events[5].append))
        wait_idle(engine)
        state["fail_decode"] = False
        later: list = []
        engine.submit(GenerationRequest(prompts[1], edits["alice"], SamplingParams(max_tokens=6), later.append))
        wait_idle(engine)
        assert engine.alive
    finally:
        engine.close()
        handle.remove()
    assert isinstance(events[0][-1], Failed) and "injected failure" in events[0][-1].message
    for i in range(1, 5):
        assert isinstance(events[i][-1], Done)
        ids = [t for e in events[i] if isinstance(e, Tokens) for t in e.ids]
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == expected[i - 1]
    assert isinstance(events[5][-1], Failed) and sum(isinstance(e, Tokens) for e in events[5]) == 1  # prefill ok, decode failed
    assert isinstance(later[-1], Done)


def test_streaming_equals_non_streaming_with_usage_and_stop(server):
    with client(server) as c:
        plain = c.post("/v1/chat/completions", json=body(PROMPTS[4], "bob", 24)).json()
        text = plain["choices"][0]["message"]["content"]
        with c.stream("POST", "/v1/chat/completions", json=body(PROMPTS[4], "bob", 24, stream=True, stream_options={"include_usage": True})) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            streamed, events = sse_text(r)
        assert streamed == text
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
        # a stop string that occurs in the answer: the text ends before it, streamed or not
        assert len(text) > 6
        stop = text[3:6]
        cut = text[: text.find(stop)].strip()
        stopped = c.post("/v1/chat/completions", json=body(PROMPTS[4], "bob", 24, stop=[stop])).json()
        assert stopped["choices"][0]["message"]["content"] == cut and stopped["choices"][0]["finish_reason"] == "stop"
        with c.stream("POST", "/v1/chat/completions", json=body(PROMPTS[4], "bob", 24, stop=stop, stream=True)) as r:
            assert sse_text(r)[0] == cut


def test_text_assembler_deltas_add_up_to_the_final_text(tokenizer):
    """Oracle: decode(all ids).strip() cut at the first stop string; multi-byte characters split over tokens."""
    text = "  Héllo 🙌🏽 wörld!!  \n\n and 日本語 text  "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for stop in [(), ("🙌",), ("rld", "xyz"), ("nothing here",)]:
        assembler = TextAssembler(tokenizer, stop)
        deltas = [assembler.add([t]) for t in ids] + [assembler.finish()]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [full.find(s) for s in stop if full.find(s) >= 0]
        expected = (full[: min(cuts)] if cuts else full).strip()
        assert "".join(deltas) == expected == assembler.text
        assert assembler.stopped == bool(cuts)
        assert all("\ufffd" not in d for d in deltas)
        collected = TextAssembler(tokenizer, stop, incremental=False)  # the non-streaming path
        for t in ids:
            collected.add([t])
        assert collected.text == expected and collected.stopped == bool(cuts)


def test_sampling_is_repeatable_per_seed_whatever_the_batch(server):
    with client(server) as c:
        def ask(seed):
            request = body(PROMPTS[1], "alice", 12, temperature=1.0, top_p=0.9, seed=seed)
            return c.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]

        alone = ask(7)
        with ThreadPoolExecutor(4) as pool:  # the same seed inside a batch with other requests
            together = list(pool.map(ask, [7, 8, 9, 7]))
        assert together[0] == together[3] == alone
        assert len({alone, *together[1:3]}) > 1


def test_repetition_penalty_matches_offline(server, tiny):
    model, tokenizer, edits, _, _ = tiny
    with client(server) as c:
        answer = c.post("/v1/chat/completions", json=body(PROMPTS[2], "alice", 16, repetition_penalty=1.3)).json()
    wait_idle(server.engine)
    assert answer["choices"][0]["message"]["content"] == offline(model, tokenizer, [PROMPTS[2]], edits["alice"], 16, repetition_penalty=1.3)[0]


def test_client_disconnect_cancels_the_row(server):
    before = server.engine.stats()["cancelled"]
    with client(server) as c:
        with c.stream("POST", "/v1/chat/completions", json=body(PROMPTS[0], "alice", 64, stream=True)) as r:
            next(r.iter_lines())
    deadline = time.monotonic() + 10
    while server.engine.stats()["cancelled"] == before:
        assert time.monotonic() < deadline, "the disconnected stream's row was not cancelled"
        time.sleep(0.01)


def test_openai_client_example(server, tiny):
    """The README's call pattern with the official openai package."""
    from openai import OpenAI, PermissionDeniedError

    model, tokenizer, edits, _, _ = tiny
    client_ = OpenAI(base_url=f"{server.url}/v1", api_key="tok-all")
    reply = client_.chat.completions.create(model=NAME, messages=chat(PROMPTS[3]), user="alice", max_tokens=8, temperature=0)
    streamed = client_.chat.completions.create(model=NAME, messages=chat(PROMPTS[3]), user="alice", max_tokens=8, temperature=0, stream=True)
    text = "".join(part.choices[0].delta.content or "" for part in streamed if part.choices)
    fallback = client_.chat.completions.create(model=NAME, messages=chat(PROMPTS[3]), user="nobody", max_tokens=8, extra_body={"unknown_user": "unsteered"})
    assert [m.id for m in client_.models.list()] == [NAME]
    with pytest.raises(PermissionDeniedError):
        OpenAI(base_url=f"{server.url}/v1", api_key="tok-alice").chat.completions.create(model=NAME, messages=chat("Hi"), user="bob")
    wait_idle(server.engine)
    assert reply.choices[0].message.content == text == offline(model, tokenizer, [PROMPTS[3]], edits["alice"], 8)[0]
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens == len(render_chat(tokenizer, chat(PROMPTS[3])))
    assert fallback.choices[0].message.content == offline(model, tokenizer, [PROMPTS[3]], None, 8)[0]


def test_closing_the_engine_ends_every_request(tiny):
    model, tokenizer, edits, _, _ = tiny
    engine = Engine(model, tokenizer, max_batch_size=2, batch_window=0.0).start()
    events: list[list] = [[] for _ in range(5)]
    for i in range(5):
        engine.submit(GenerationRequest(render_chat(tokenizer, chat(PROMPTS[i])), edits["bob"], SamplingParams(max_tokens=64), events[i].append))
    engine.close()
    for got in events:  # exactly one final event each, whether it finished or was cancelled
        assert [type(e) for e in got if not isinstance(e, Tokens)] == [Done]
    assert engine.stats()["in_flight"] == 0 and engine.stats()["cancelled"] >= 1
    with pytest.raises(EngineClosed):
        engine.submit(GenerationRequest([1, 2], None, SamplingParams(), print))


def test_tokens_file_and_limits_are_checked(tmp_path):
    path = tmp_path / "tokens.json"
    for bad in ["[]", "{}", '{"t": "alice"}', '{"t": ["../x"]}', '{"a b": ["alice"]}']:
        path.write_text(bad)
        with pytest.raises(InputError):
            read_tokens(path)
    path.write_text('{"t1": ["alice", "bob"], "t2": "*"}')
    assert read_tokens(path) == {"t1": frozenset({"alice", "bob"}), "t2": None}
    with pytest.raises(InputError):
        Limits(max_tokens=8, default_max_tokens=16)
    with pytest.raises(InputError):
        SamplingParams(max_tokens=0)


def test_cli_serve_refuses_bad_input_before_loading_the_model(tmp_path, capsys):
    from repedit.cli.main import main

    assert main(["serve", "--store", str(tmp_path / "missing")]) == 2
    assert "not a vector store" in capsys.readouterr().err
    (tmp_path / "tokens.json").write_text('{"t": "alice"}')
    assert main(["serve", "--tokens", str(tmp_path / "tokens.json")]) == 2
    assert "list of user ids" in capsys.readouterr().err


def test_cli_serve_end_to_end(tiny_folder, tmp_path):
    """``repedit serve`` in a subprocess on a local tiny model folder: health, a steered request, 403."""
    import socket
    import subprocess
    import sys

    folder, model = tiny_folder
    fp = repedit.model_fingerprint(model)
    store = save_edits({"alice": UserEdit("alice", [SiteEdit("resid_post.1", "add", vector=torch.ones(HIDDEN))], fp, HIDDEN)}, tmp_path / "store")
    (tmp_path / "tokens.json").write_text('{"tok": ["alice"]}')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "repedit", "serve", "--model", str(folder), "--store", str(store), "--tokens", str(tmp_path / "tokens.json"),
               "--port", str(port), "--served-name", "tiny", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.poll() is not None else "timeout"
            time.sleep(0.2)
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer tok"}, timeout=60) as c:
            answer = c.post("/v1/chat/completions", json={**body("Hi", "alice", 4), "model": "tiny"})
            assert answer.status_code == 200 and answer.headers["x-repedit-steered"] == "true"
            assert answer.json()["usage"]["completion_tokens"] >= 1
            assert c.post("/v1/chat/completions", json={**body("Hi", "bob", 4), "model": "tiny"}).status_code == 403
    finally:
        process.terminate()
        process.wait(30)


# ----------------------------------------------------------------- the real default model

@pytest.mark.default_model
def test_default_model_32_concurrent_requests_for_8_users_equal_offline(default_model_and_tokenizer, tmp_path):
    model, tokenizer = default_model_and_tokenizer
    fp = repedit.model_fingerprint(model)
    torch.manual_seed(0)
    # Stylevector-like edits: random directions at resid_post.12 with ~0.3 x the residual norm there (~100).
    edits = {f"user{u}": UserEdit(f"user{u}", [SiteEdit("resid_post.12", "add", vector=torch.nn.functional.normalize(torch.randn(576), dim=0) * 30)], fp, 576)
             for u in range(8)}
    store = save_edits(edits, tmp_path / "store")
    jobs = [(f"user{u}", (u + k) % len(PROMPTS)) for u in range(8) for k in range(4)]
    expected = {}
    for user in edits:
        indices = [i for u, i in jobs if u == user]
        expected.update(zip([(user, i) for i in indices], offline(model, tokenizer, [PROMPTS[i] for i in indices], edits[user], 12)))
    unsteered = offline(model, tokenizer, PROMPTS, None, 12)
    assert sum(expected[job] != unsteered[job[1]] for job in jobs) >= len(jobs) // 2  # the edits really steer

    app = create_app(model, tokenizer, store, ServerConfig("smollm2", max_batch_size=64, batch_window=0.05))
    with BackgroundServer(app) as running, httpx.Client(base_url=running.url, timeout=300, limits=httpx.Limits(max_connections=64)) as c:
        def send(job):
            request = {"model": "smollm2", "messages": chat(PROMPTS[job[1]]), "user": job[0], "max_tokens": 12, "temperature": 0}
            if jobs.index(job) % 2:
                with c.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as r:
                    assert r.status_code == 200
                    return sse_text(r)[0]
            r = c.post("/v1/chat/completions", json=request)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(send, jobs))
        stats = app.state.engine.stats()
    for job, answer in zip(jobs, answers):
        assert answer == expected[job], job
    assert stats["peak_batch"] >= 8 and stats["finished"] == len(jobs)
