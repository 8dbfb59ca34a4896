"""GGUF checkpoints (llama.cpp) through the ``gguf`` package.

* tensor names are mapped from llama.cpp's (``blk.3.attn_q.weight``) to HuggingFace's
  (``model.layers.3.self_attn.q_proj.weight``), so the same ``.mpk`` binds both formats;
* quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised with ``gguf.quants.dequantize``;
* for Llama-architecture files the Q/K row permutation that llama.cpp's converter applies (to turn
  HF's half-split "neox" rotary layout into interleaved pairs) is undone, giving HF's layout back;
* the metadata becomes an HF-style config dict, and the tokenizer (vocab, merges, token types,
  special ids, pre-tokenizer kind) and chat template are read for :mod:`mpkir.models.tokenizer`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from mpkir.diagnostics import error

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_0-9]+)\.(weight|bias)$")

PERMUTED_ARCHS = ("llama", "mistral", "granite")
"""Architectures whose Q/K rows llama.cpp's converter permutes (HF Llama-style checkpoints)."""

MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen3": "qwen3", "qwen2": "qwen2", "granite": "llama"}


def hf_name(gguf_name: str) -> str | None:
    """The HuggingFace name of a llama.cpp tensor name (None if it has no counterpart)."""
    m = _BLOCK_RE.match(gguf_name)
    if m:
        part = _BLOCK.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    m = _GLOBAL_RE.match(gguf_name)
    if m and m.group(1) in _GLOBAL:
        return f"{_GLOBAL[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute``: rows (head, pair, 2) back to HF's (head, 2 halves, pair)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {w.shape} over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF layout → interleaved); the inverse of :func:`unpermute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _require_gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise error("reading .gguf files needs the 'gguf' package: pip install -e '.[models]'") from e
    return gguf


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


class GGUFFile:
    """An opened GGUF file: tensors under HF names, an HF-style config and the tokenizer data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise error(f"GGUF file {self.path} does not exist")
        gguf = _require_gguf()
        self._gguf = gguf
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:
            raise error(f"{self.path}: not a readable GGUF file: {e}") from e
        self.arch = str(_field(self.reader, "general.architecture", ""))
        if self.arch not in MODEL_TYPES:
            raise error(
                f"{self.path}: GGUF architecture '{self.arch}' is not supported "
                f"(supported: {', '.join(MODEL_TYPES)})"
            )
        self.config = self._config()
        self._tensors: dict[str, Any] = {}
        self.unmapped: list[str] = []
        for t in self.reader.tensors:
            n = hf_name(t.name)
            if n is None:
                self.unmapped.append(t.name)
                n = t.name
            self._tensors[n] = t

    # ---------------------------------------------------------------- config
    def _config(self) -> dict:
        a = self.arch
        r = self.reader

        def g(key, default=None):
            return _field(r, f"{a}.{key}", default)

        hidden = int(g("embedding_length"))
        heads = int(g("attention.head_count"))
        kv_heads = int(g("attention.head_count_kv", heads))
        tokens = r.fields.get("tokenizer.ggml.tokens")
        vocab = int(g("vocab_size", len(tokens.data) if tokens is not None else 0))
        names = {t.name for t in r.tensors}
        cfg: dict[str, Any] = {
            "model_type": MODEL_TYPES[a],
            "hidden_size": hidden,
            "num_hidden_layers": int(g("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": int(g("attention.key_length", hidden // heads)),
            "intermediate_size": int(g("feed_forward_length")),
            "vocab_size": vocab,
            "rope_theta": float(f"{float(g('rope.freq_base', 10000.0)):.7g}"),
            "rms_norm_eps": float(f"{float(g('attention.layer_norm_rms_epsilon', 1e-6)):.7g}"),
            "max_position_embeddings": int(g("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in names,
            "hidden_act": "silu",
        }
        scaling = g("rope.scaling.type")
        if scaling not in (None, "none"):
            cfg["rope_scaling"] = {"type": str(scaling), "factor": float(g("rope.scaling.factor", 1.0))}
        if "rope_freqs.weight" in names:
            cfg["rope_scaling"] = self._llama3_scaling(cfg, int(g("rope.dimension_count", cfg["head_dim"])),
                                                       g("rope.scaling.original_context_length"))
        for key, name in (
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ):
            v = _field(r, name)
            if v is not None:
                cfg[key] = int(v)
        cfg["gguf_name"] = str(_field(r, "general.name", ""))
        return cfg

    def _llama3_scaling(self, cfg: dict, rd: int, original_context) -> dict:
        """Llama-3 ``rope_scaling`` recovered from the file's ``rope_freqs`` table (see
        :mod:`mpkir.models.rope_freqs`); a table no llama3 parameters reproduce is kept as the reason
        :func:`mpkir.models.config.unsupported` reports."""
        from mpkir.models.rope_freqs import llama3_scaling_from_factors

        t = next(t for t in self.reader.tensors if t.name == "rope_freqs.weight")
        table = np.asarray(self._gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
        try:
            found = llama3_scaling_from_factors(table, rd, cfg["rope_theta"],
                                                None if original_context is None else int(original_context))
        except ValueError as e:
            return {"rope_type": "llama3", "source": f"gguf rope_freqs: {e}"}
        if found is None:
            return {"rope_type": "default"}
        return {"rope_type": "llama3", **found, "source": "gguf rope_freqs"}

    # ---------------------------------------------------------------- tensors (TensorSource)
    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors[name]
        return tuple(int(x) for x in reversed([int(d) for d in t.shape]))

    def quant_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def load(self, name: str) -> np.ndarray:
        """The tensor in float32 (dequantised), in HF layout."""
        t = self._tensors[name]
        w = self._gguf.quants.dequantize(t.data, t.tensor_type)
        w = np.asarray(w, dtype=np.float32).reshape(self.shape(name))
        if self.arch in PERMUTED_ARCHS:
            if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
                w = unpermute_qk(w, self.config["num_attention_heads"])
            elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
                w = unpermute_qk(w, self.config["num_key_value_heads"])
        return w

    # ---------------------------------------------------------------- tokenizer
    def tokenizer_data(self) -> dict:
        """Vocabulary, merges, token types, special ids and chat template carried by the file."""
        r = self.reader
        model = _field(r, "tokenizer.ggml.model")
        if model is None:
            raise error(f"{self.path}: carries no tokenizer")
        data = {
            "model": str(model),
            "pre": str(_field(r, "tokenizer.ggml.pre", "default")),
            "tokens": list(_field(r, "tokenizer.ggml.tokens")),
            "token_type": [int(x) for x in _field(r, "tokenizer.ggml.token_type", [])],
            "merges": list(_field(r, "tokenizer.ggml.merges", [])),
            "bos_token_id": _field(r, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id"),
            "eot_token_id": _field(r, "tokenizer.ggml.eot_token_id"),
            "add_bos_token": bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
            "chat_template": _field(r, "tokenizer.chat_template"),
        }
        return data


def save_gguf(
    path: str | Path,
    tensors: dict[str, np.ndarray],
    config: dict,
    tokenizer: dict | None = None,
    quant: str | None = None,
) -> None:
    """Write HF-named tensors + config as a llama.cpp-style GGUF (tests and toy models).

    Applies the converter's Q/K permutation for Llama; ``quant`` (e.g. ``"Q8_0"``, ``"Q4_1"``)
    quantises the 2-D projection weights.  ``tokenizer``: ``tokens``, ``merges``, ``token_type``,
    ``pre``, ``bos_token_id``, ``eos_token_id``, ``chat_template``.
    """
    from mpkir.models.config import rope_scaling_attrs
    from mpkir.models.rope_freqs import llama3_factors

    gguf = _require_gguf()
    arch = {"llama": "llama", "qwen3": "qwen3"}[config.get("model_type", "llama")]
    inv_block = {v: k for k, v in _BLOCK.items()}
    inv_global = {v: k for k, v in _GLOBAL.items()}
    tmp = Path(str(path) + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch=arch)
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_vocab_size(int(config["vocab_size"]))
    if config.get("head_dim"):
        w.add_key_length(int(config["head_dim"]))
        w.add_value_length(int(config["head_dim"]))
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer.get("pre", "gpt2"))
        w.add_token_list(tokenizer["tokens"])
        w.add_token_types(tokenizer.get("token_type") or [1] * len(tokenizer["tokens"]))
        w.add_token_merges(tokenizer["merges"])
        if tokenizer.get("bos_token_id") is not None:
            w.add_bos_token_id(int(tokenizer["bos_token_id"]))
        if tokenizer.get("eos_token_id") is not None:
            w.add_eos_token_id(int(tokenizer["eos_token_id"]))
        if tokenizer.get("chat_template"):
            w.add_chat_template(tokenizer["chat_template"])
    scaling = rope_scaling_attrs(config)
    if scaling is not None:  # llama.cpp's converter keeps only the table of factors
        w.add_tensor("rope_freqs.weight", llama3_factors(
            int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            float(config.get("rope_theta", 10000.0)),
            **{k: v for k, v in scaling.items() if k != "scaling"}))
    qt = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    for name, arr in tensors.items():
        a = np.asarray(arr, dtype=np.float32)
        m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m:
            gname = f"blk.{m.group(1)}.{inv_block[m.group(2)]}.{m.group(3)}"
        else:
            base, kind = name.rsplit(".", 1)
            gname = f"{inv_global[base]}.{kind}"
        if arch in PERMUTED_ARCHS and ".attn_q." in gname:
            a = permute_qk(a, heads)
        elif arch in PERMUTED_ARCHS and ".attn_k." in gname:
            a = permute_qk(a, kv)
        if qt is not None and a.ndim == 2 and gname != "token_embd.weight":
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)


def tokenizer_json_to_gguf_data(tokenizer_json: str | Path) -> dict:
    """Vocabulary, merges and special tokens of a byte-level BPE ``tokenizer.json`` in GGUF terms."""
    import json

    tj = json.loads(Path(tokenizer_json).read_text())
    vocab = tj["model"]["vocab"]
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [1] * len(tokens)
    for a in tj.get("added_tokens", []):
        if a["id"] < len(types):
            types[a["id"]] = 3 if a.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return {"tokens": tokens, "token_type": types, "merges": merges, "pre": "gpt2"}
