"""Shared fixtures: the real default model (loaded once per session, offline) and tiny random models.

Tiny models use the default model's tokenizer (vocab 49152), so every token id it produces is valid.
With ``hidden_size=64`` the embedding matrix is 3M parameters, which keeps a forward pass ~1 ms.
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 49152
HIDDEN = 64
N_LAYERS = 3

# Every architecture the tiny-model factory can build; "gpt_neox_seq" is GPT-NeoX with
# use_parallel_residual=False (sequential residual), "gpt_neox" the default parallel residual.
ARCHS = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "gpt2", "gpt_neox", "gpt_neox_seq", "phi3"]


def make_config(arch: str):
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
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, n_positions=512)
    if arch in ("gpt_neox", "gpt_neox_seq"):
        return tf.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=N_LAYERS,
            num_attention_heads=4, max_position_embeddings=512, use_parallel_residual=(arch == "gpt_neox"),
        )
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
def tokenizer(default_model_and_tokenizer):
    return default_model_and_tokenizer[1]


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
