"""Tiny random Qwen3 and Llama checkpoints (HF layout, safetensors) for tests of loading and generation."""

from __future__ import annotations

from pathlib import Path

PROMPT_TEXTS = ("What is the capital of France?", "the quick brown fox", "def add(a, b): return a + b",
                "Paris", "one two three four five six", "Hello")


def tiny_config(kind: str, vocab: int, hidden: int = 128, head_dim: int = 64, intermediate: int = 256,
                qwen3_head_dim: int = 128) -> dict:
    """An HF ``config.json`` dict: 2 layers, 4 query heads over 2 KV heads; Qwen3 ties its embeddings."""
    c = {
        "hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": head_dim, "intermediate_size": intermediate, "vocab_size": vocab, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "max_position_embeddings": 256,
    }
    if kind == "qwen3":
        return {**c, "model_type": "qwen3", "rope_theta": 1e6, "tie_word_embeddings": True,
                "head_dim": qwen3_head_dim}
    if kind != "llama":
        raise ValueError(f"unknown tiny model kind {kind!r} (qwen3, llama)")
    return {**c, "model_type": "llama", "rope_theta": 500000.0, "tie_word_embeddings": False}


def write_tiny_checkpoint(directory: Path, kind: str, seed: int, n_prompts: int = 4, **sizes) -> dict:
    """Tokenizer + random weights + config in ``directory``: {dir, prompts (token ids), kind, cfg};
    ``sizes``: :func:`tiny_config`'s (hidden, intermediate, ...)."""
    from mpkir.models.reference import random_checkpoint
    from mpkir.models.safetensors_loader import save_checkpoint
    from mpkir.models.tokenizer import write_tiny_tokenizer

    tok = write_tiny_tokenizer(directory)
    cfg = tiny_config(kind, tok.vocab_size, **sizes)
    save_checkpoint(directory, random_checkpoint(cfg, seed=seed), cfg)
    return {"dir": directory, "prompts": [tok.encode(s) for s in PROMPT_TEXTS[:n_prompts]], "kind": kind,
            "cfg": cfg}
