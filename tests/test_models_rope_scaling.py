"""Llama-3.x ``rope_scaling`` (rope_type llama3): config.json → rope attributes, against HF transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpkir.diagnostics import MpkError
from mpkir.models import config as mconfig
from mpkir.ops.attention import rope_inv_freq

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LLAMA_3_2_1B_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def test_inv_freq_equals_hf_llama3_init_for_llama_3_2_1b():
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tf.LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling=dict(LLAMA_3_2_1B_ROPE))
    hf, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    hf = hf.numpy()
    attrs = mconfig.rope_scaling_attrs({"rope_scaling": LLAMA_3_2_1B_ROPE})
    ours = rope_inv_freq(64, 500000.0, **attrs)
    assert ours.dtype == np.float64 and attention_factor == 1.0
    plain = rope_inv_freq(64, 500000.0)
    assert (np.abs(ours / plain - 1) > 1e-6).sum() == 17  # 17 of the 32 frequencies are rescaled
    # HF forms θ^x and the interpolation in float32 arithmetic; ours is float64 rounded once to float32:
    # they agree to within 3 float32 ulps (and 2.1e-7 relative), entry by entry
    ulps = np.abs(ours.astype(np.float32).view(np.int32).astype(np.int64) - hf.view(np.int32))
    assert ulps.max() <= 3, ulps
    np.testing.assert_allclose(ours, hf, rtol=2.5e-7, atol=0)


def test_config_sets_rope_attributes_and_refuses_other_scalings():
    from mpkir.parser import parse
    from mpkir.printer import print_module
    from mpkir.verify import analyze

    src = (EXAMPLES / "llama3_2_1b.mpk").read_text()
    m = parse(src, "llama3_2_1b.mpk")
    cfg = {"hidden_size": 2048, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA_3_2_1B_ROPE)}
    scaled = mconfig.apply_config(m, cfg, source=src)
    text = print_module(scaled)
    assert text.count("scaling=llama3") == 2 and text.count("factor=32.0") == 2
    assert "original_max_position=8192" in text

    assert not [d for d in analyze(scaled).diagnostics if d.severity == "error"]
    # no rope_scaling (SmolLM2, Qwen3): the module is unchanged; transformers 5's rope_parameters work too
    assert print_module(mconfig.apply_config(m, {"hidden_size": 2048}, source=src)) == print_module(m)
    tf5 = {"rope_parameters": {**LLAMA_3_2_1B_ROPE, "rope_theta": 500000.0}}
    assert mconfig.rope_scaling_attrs(tf5)["factor"] == 32.0
    assert mconfig.config_values(tf5)["rope_theta"] == 5e5
    with pytest.raises(MpkError, match="without factor, low_freq_factor, high_freq_factor, original_max_"):
        mconfig.apply_config(m, {"rope_scaling": {"rope_type": "llama3", "source": "gguf rope_freqs"}})
    with pytest.raises(MpkError, match="rope_scaling of type 'yarn'"):
        mconfig.apply_config(m, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, source=src)


TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    # wavelengths 2π·θ^(i/8): 6.3 (kept), 32.5 (interpolated), 168 and longer (divided by 8)
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
}
SERVE = {"max_requests": 2, "max_tokens": 64, "max_seq_len": 128, "page_size": 16}


def test_tiny_scaled_llama_generates_hf_transformers_tokens(tmp_path):
    """A random Llama checkpoint with llama3 rope_scaling: greedy tokens equal HF transformers' (CPU, f32)."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from mpkir.models.backends import InterpreterBackend
    from mpkir.models.engine import Engine, EngineConfig
    from mpkir.models.loader import load_model
    from mpkir.models.reference import ReferenceModel, random_checkpoint
    from mpkir.models.safetensors_loader import save_checkpoint
    from mpkir.models.tokenizer import write_tiny_tokenizer
    from mpkir.printer import print_module
    from mpkir.verify import analyze

    tok = write_tiny_tokenizer(tmp_path)
    cfg = {**TINY, "vocab_size": tok.vocab_size}
    w = random_checkpoint(cfg, seed=5)
    save_checkpoint(tmp_path, w, cfg)
    hf = tf.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(0, tok.vocab_size, n)] for n in (5, 23)]
    n_new = 16   # positions up to 38: the interpolated and divided frequencies turn by > 1 radian
    want = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, eos_token_id=None)
            want.append(out[0, len(p):].tolist())
    assert [ReferenceModel(w, cfg).greedy(p, n_new) for p in prompts] == want   # independent float64 model

    m = load_model(tmp_path, serve=SERVE, weight_dtype="f32")
    assert print_module(m.module).count("scaling=llama3") == 2
    eng = Engine(InterpreterBackend(m.module, m.analysis, m.weights, float_storage="f32"),
                 EngineConfig.from_serve(m.serve))
    got = [r.output for r in eng.generate(prompts, n_new, stop_ids=())]
    assert got == want

    # the scaling matters: logits of the whole sequence with and without it, against HF's
    seq = prompts[1] + want[1]
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].numpy().astype(np.float64)

    def logits(module, analysis):
        be = InterpreterBackend(module, analysis, m.weights, float_storage="f32")
        return be.step(np.array(seq, np.int32), np.arange(len(seq), dtype=np.int32),
                       np.zeros(len(seq), np.int32), np.arange(8, dtype=np.int32)[None].repeat(2, 0))

    err = np.linalg.norm(logits(m.module, m.analysis) - ref) / np.linalg.norm(ref)
    assert err < 1e-5, err
    plain = mconfig.set_rope_scaling(m.module, {"scaling": "none"})
    err_plain = np.linalg.norm(logits(plain, analyze(plain)) - ref) / np.linalg.norm(ref)
    assert err_plain > 100 * err, (err, err_plain)


# ---------------------------------------------------------------- GGUF: llama.cpp's table of factors
@settings(max_examples=60, deadline=None)
@given(rd=st.sampled_from([16, 32, 64, 128]), theta=st.sampled_from([1e4, 5e5, 1e6]),
       factor=st.floats(1.5, 64.0), low=st.floats(0.5, 4.0), ratio=st.floats(1.5, 16.0),
       old=st.sampled_from([64, 1024, 8192, 32768]))
def test_llama3_parameters_recovered_from_the_factor_table(rd, theta, factor, low, ratio, old):
    """Any llama3 parameters -> llama.cpp's table -> parameters that give the same frequencies."""
    from mpkir.models.rope_freqs import llama3_factors, llama3_scaling_from_factors

    table = llama3_factors(rd, theta, factor, low, low * ratio, old)
    found = llama3_scaling_from_factors(table, rd, theta)
    want = rope_inv_freq(rd, theta, "llama3", factor, low, low * ratio, old)
    if found is None:   # every wavelength below the band: the scaling changes nothing
        assert np.all(table == 1.0)
        found = {"rope_type": "default"}
    got = rope_inv_freq(rd, theta, **(mconfig.rope_scaling_attrs({"rope_scaling": {"rope_type": "llama3",
                                                                                   **found}}) or {}))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=0)


def test_factor_tables_of_real_llama3_checkpoints_give_their_config_back():
    from mpkir.models.rope_freqs import llama3_factors, llama3_scaling_from_factors

    llama31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    for rd, params in ((64, LLAMA_3_2_1B_ROPE), (128, llama31)):
        want = {k: params[k] for k in llama31}
        args = (want["factor"], want["low_freq_factor"], want["high_freq_factor"],
                want["original_max_position_embeddings"])
        assert llama3_scaling_from_factors(llama3_factors(rd, 5e5, *args), rd, 5e5) == want
    assert llama3_scaling_from_factors(np.ones(32, np.float32), 64, 5e5) is None


def test_a_table_that_is_not_llama3_scaling_is_refused_with_the_reason():
    from mpkir.models.rope_freqs import llama3_factors, llama3_scaling_from_factors

    with pytest.raises(ValueError, match="expected 32"):
        llama3_scaling_from_factors(np.ones(16), 64, 5e5)
    with pytest.raises(ValueError, match="do not grow with the wavelength"):
        llama3_scaling_from_factors(np.linspace(4.0, 1.0, 32), 64, 5e5)
    with pytest.raises(ValueError, match="below 1"):
        llama3_scaling_from_factors(np.full(32, 0.5), 64, 5e5)
    bent = llama3_factors(64, 5e5, 32.0, 1.0, 4.0, 8192).astype(np.float64)
    mid = np.flatnonzero((bent > 1.001) & (bent < 31.9))
    bent[mid[1]] *= 1.01   # one interpolated entry off the llama3 curve
    with pytest.raises(ValueError, match="no llama3 parameters"):
        llama3_scaling_from_factors(bent, 64, 5e5)


def test_tiny_scaled_llama_from_gguf_generates_the_reference_tokens(tmp_path):
    """save_gguf writes llama.cpp's rope_freqs table (not the parameters); loading the GGUF recovers them."""
    pytest.importorskip("gguf")
    from mpkir.models.backends import InterpreterBackend
    from mpkir.models.engine import Engine, EngineConfig
    from mpkir.models.gguf_loader import GGUFFile, save_gguf, tokenizer_json_to_gguf_data
    from mpkir.models.loader import load_model
    from mpkir.models.reference import ReferenceModel, random_checkpoint
    from mpkir.models.tokenizer import write_tiny_tokenizer
    from mpkir.printer import print_module

    vocab = write_tiny_tokenizer(tmp_path).vocab_size
    cfg = {**TINY, "vocab_size": vocab}
    w = random_checkpoint(cfg, seed=9)
    save_gguf(tmp_path / "m.gguf", w, cfg, tokenizer=tokenizer_json_to_gguf_data(tmp_path / "tokenizer.json"))
    f = GGUFFile(tmp_path / "m.gguf")
    assert "rope_freqs.weight" in f.names()
    rs = f.config["rope_scaling"]
    keys = mconfig.LLAMA3_KEYS
    assert {k: rs[k] for k in keys} == {k: TINY["rope_scaling"][k] for k in keys}

    m = load_model(tmp_path / "m.gguf", serve=SERVE, weight_dtype="f32")
    text = print_module(m.module)
    assert text.count("scaling=llama3") == 2 and "original_max_position=64" in text
    rng = np.random.default_rng(1)
    prompts = [[int(x) for x in rng.integers(0, vocab, n)] for n in (4, 19)]
    eng = Engine(InterpreterBackend(m.module, m.analysis, m.weights, float_storage="f32"),
                 EngineConfig.from_serve(m.serve))
    got = [r.output for r in eng.generate(prompts, 16, stop_ids=())]
    assert got == [ReferenceModel(w, cfg).greedy(p, 16) for p in prompts]


def test_gguf_with_a_foreign_factor_table_is_refused_by_name(tmp_path):
    pytest.importorskip("gguf")
    import gguf

    from mpkir.models.gguf_loader import GGUFFile
    from mpkir.models.loader import load_model

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), arch="llama")
    for key, val in (("block_count", 1), ("embedding_length", 64), ("head_count", 4), ("head_count_kv", 2),
                     ("feed_forward_length", 96), ("vocab_size", 96), ("key_length", 16)):
        getattr(w, f"add_{key}")(val)
    w.add_rope_freq_base(5e5)
    w.add_tensor("rope_freqs.weight", np.linspace(3.0, 1.0, 8).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "do not grow" in GGUFFile(tmp_path / "x.gguf").config["rope_scaling"]["source"]
    with pytest.raises(MpkError, match=r"type 'llama3'.*gguf rope_freqs: factors do not grow"):
        load_model(tmp_path / "x.gguf", serve=SERVE, weight_dtype="f32")
