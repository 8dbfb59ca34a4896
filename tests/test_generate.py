"""Real checkpoints end to end through the compiled example .mpk files on the CPU (NumPy interpreter).

Tiny random Qwen3 and Llama checkpoints (safetensors + config.json + tokenizer, and GGUF) are written
here, loaded into ``examples/qwen3_0_6b.mpk`` / ``examples/llama3_2_1b.mpk`` sized from their config,
and must generate the tokens of the independent float64 reference (:mod:`mpkir.models.reference`)
and of the interpreter running each whole sequence at once.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("mpkir.interpreter")

from mpkir.models.backends import InterpreterBackend
from mpkir.models.engine import Engine, EngineConfig, SamplingParams
from mpkir.models.loader import load_model
from mpkir.models.reference import ReferenceModel, random_checkpoint
from mpkir.models.safetensors_loader import save_checkpoint
from mpkir.models.tokenizer import write_tiny_tokenizer
from mpkir.testing.tiny_models import tiny_config

SERVE = {"max_requests": 4, "max_tokens": 64, "max_seq_len": 128, "page_size": 16}
N_NEW = 10


def _config(kind: str, vocab: int) -> dict:
    return tiny_config(kind, vocab, hidden=64, head_dim=16, intermediate=96, qwen3_head_dim=32)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    tok = write_tiny_tokenizer(d)
    cfg = _config(request.param, tok.vocab_size)
    w = random_checkpoint(cfg, seed=11)
    save_checkpoint(d, w, cfg)
    ref = ReferenceModel(w, cfg)
    prompts = [
        tok.encode(s)
        for s in (
            "What is the capital of France?",
            "the quick brown fox",
            "def add(a, b): return a + b and more",
            "Paris",
        )
    ]
    want = [ref.greedy(p, N_NEW) for p in prompts]
    return {
        "dir": d,
        "cfg": cfg,
        "tok": tok,
        "ref": ref,
        "prompts": prompts,
        "want": want,
        "kind": request.param,
    }


def _engine(loaded, float_storage="f32", **kw):
    backend = InterpreterBackend(loaded.module, loaded.analysis, loaded.weights, float_storage=float_storage)
    return Engine(backend, EngineConfig.from_serve(loaded.serve, **kw))


def test_loads_sized_from_config(ckpt):
    m = load_model(ckpt["dir"], serve=SERVE, weight_dtype="f32")
    assert m.fmt == "safetensors"
    assert m.mpk_path.name == ("qwen3_0_6b.mpk" if ckpt["kind"] == "qwen3" else "llama3_2_1b.mpk")
    consts = m.analysis.env.consts
    assert consts["hidden"] == 64 and consts["layers"] == 2 and consts["vocab"] == ckpt["cfg"]["vocab_size"]
    assert m.serve.max_requests == 4 and m.serve.page_size == 16
    lm = m.module.weight("lm_head").checkpoint
    assert lm == ("model.embed_tokens.weight" if ckpt["cfg"]["tie_word_embeddings"] else "lm_head.weight")


def test_greedy_matches_float64_reference_batched_and_alone(ckpt):
    m = load_model(ckpt["dir"], serve=SERVE, weight_dtype="f32")
    e = _engine(m)
    reqs = e.generate(ckpt["prompts"], N_NEW, SamplingParams(), stop_ids=())
    assert [r.output for r in reqs] == ckpt["want"]
    assert e.stats.max_batch == 4
    for p, want in zip(ckpt["prompts"][:2], ckpt["want"][:2], strict=True):
        alone = _engine(m).generate([p], N_NEW, stop_ids=())[0]
        assert alone.output == want


def test_bf16_incremental_equals_whole_sequence(ckpt):
    """bf16 storage: the paged, batched, incremental run equals the interpreter over whole sequences."""
    m = load_model(ckpt["dir"], serve=SERVE)
    reqs = _engine(m, float_storage=None).generate(ckpt["prompts"], N_NEW, stop_ids=())
    for r in reqs:
        seq = r.prompt + r.output
        whole = InterpreterBackend(m.module, m.analysis, m.weights)
        logits = whole.step(
            np.array(seq, np.int32),
            np.arange(len(seq), dtype=np.int32),
            np.zeros(len(seq), np.int32),
            np.arange(8, dtype=np.int32)[None].repeat(4, 0),
        )
        assert [int(x) for x in np.argmax(logits[len(r.prompt) - 1 : -1], axis=-1)] == r.output


def test_joining_mid_run_and_speculative(ckpt):
    m = load_model(ckpt["dir"], serve=SERVE, weight_dtype="f32")
    e = _engine(m)
    reqs = []
    for p in ckpt["prompts"]:
        reqs.append(e.submit(p, N_NEW, stop_ids=()))
        e.step()
    e.run()
    assert [r.output for r in reqs] == ckpt["want"]
    base = ckpt["prompts"][1]
    rep = base + ckpt["ref"].greedy(base, N_NEW) + base  # the continuation recurs: drafts get proposed
    want = ckpt["ref"].greedy(rep, N_NEW)
    es = _engine(m, speculative=True, spec_k=3, ngram=2)
    r = es.generate([rep, ckpt["prompts"][0]], N_NEW, stop_ids=())
    assert r[0].output == want and r[1].output == ckpt["want"][0]
    assert es.stats.drafted > 0


def test_gguf_checkpoint_generates_the_same(ckpt, tmp_path):
    pytest.importorskip("gguf")
    from mpkir.models.gguf_loader import save_gguf, tokenizer_json_to_gguf_data
    from mpkir.models.tokenizer import CHATML_TEMPLATE

    data = tokenizer_json_to_gguf_data(ckpt["dir"] / "tokenizer.json")
    data.update(eos_token_id=ckpt["tok"].eos_token_ids[0], chat_template=CHATML_TEMPLATE)
    w = random_checkpoint(ckpt["cfg"], seed=11)
    save_gguf(tmp_path / "m.gguf", w, ckpt["cfg"], tokenizer=data)
    m = load_model(tmp_path / "m.gguf", serve=SERVE, weight_dtype="f32")
    assert m.fmt == "gguf" and m.tokenizer.encode_chat([{"role": "user", "content": "hi"}]) == ckpt[
        "tok"
    ].encode_chat([{"role": "user", "content": "hi"}])
    reqs = _engine(m).generate(ckpt["prompts"], N_NEW, stop_ids=())
    assert [r.output for r in reqs] == ckpt["want"]


def test_memory_guard(ckpt):
    from mpkir.diagnostics import MpkError

    with pytest.raises(MpkError, match=r"does not fit.*weights .* \+ KV cache"):
        load_model(ckpt["dir"], serve=SERVE, memory_bytes=100_000)


def test_generate_command_json(ckpt, capsys):
    from mpkir.cli import main

    d = ckpt["dir"]
    prompts = d / "prompts.txt"
    prompts.write_text("What is the capital of France?\nthe quick brown fox\n")
    rc = main(
        [
            "generate",
            "--model",
            str(d),
            "--prompts",
            str(prompts),
            "--max-tokens",
            str(N_NEW),
            "--device",
            "cpu",
            "--chat",
            "off",
            "--ignore-eos",
            "--json",
            "--no-progress",
            "--max-seq-len",
            "128",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert [r["tokens"] for r in res["results"]] == ckpt["want"][:2]
    assert res["stats"]["generated_tokens"] == 2 * N_NEW and res["stats"]["tokens_per_s"] > 0
    assert "tokens/s" in out.err


def test_gpu_backend_choice_reaches_the_runtime(monkeypatch):
    """``make_backend`` asks the runtime for the backend the user chose; greedy-only runs get token ids
    back from the resident kernel instead of logits (checked on the GPU in tests/test_gpu_persistent.py)."""
    from types import SimpleNamespace

    from mpkir.diagnostics import MpkError
    from mpkir.models import backends
    from mpkir.models.backends import make_backend
    from mpkir.runtime import host

    calls = []
    monkeypatch.setattr(host, "make_step_backend", lambda *a, **kw: calls.append(kw) or "backend")
    for v in ("MPKIR_KERNEL_SAMPLING", "MPKIR_KERNEL_PAGES", "MPKIR_GPU_BACKEND"):
        monkeypatch.delenv(v, raising=False)
    loaded = SimpleNamespace(module="m", analysis="a", weights="w")
    off = {"resident": True, "kernel_pages": False, "numerics": "fast"}
    make_backend(loaded, "gpu", gpu_backend="resident", greedy_only=True, kernel_pages=False)
    make_backend(loaded, "gpu", gpu_backend="resident", kernel_sampling=False, kernel_pages=False)
    make_backend(loaded, "gpu", gpu_backend="step", greedy_only=True, numerics="exact")
    make_backend(loaded, "gpu", gpu_backend="resident", kernel_sampling=True, kernel_pages=True)
    assert calls == [{**off, "output": "ids"}, {**off, "output": "logits"}, {"numerics": "exact"},
                     {**off, "output": "sample", "kernel_pages": True}]
    calls.clear()  # unset: the environment, else the defaults
    assert make_backend(loaded, "gpu", gpu_backend="resident") == "backend"
    default = "sample" if backends.DEFAULT_KERNEL_SAMPLING else "logits"
    assert calls == [{**off, "output": default, "kernel_pages": backends.DEFAULT_KERNEL_PAGES}]
    monkeypatch.setenv("MPKIR_KERNEL_SAMPLING", "1")
    monkeypatch.setenv("MPKIR_KERNEL_PAGES", "0")
    make_backend(loaded, "gpu", gpu_backend="resident")
    make_backend(loaded, "gpu", gpu_backend="resident", kernel_sampling=False, kernel_pages=True)
    assert calls[1:] == [{**off, "output": "sample"}, {**off, "output": "logits", "kernel_pages": True}]
    monkeypatch.setenv("MPKIR_KERNEL_PAGES", "yes")
    with pytest.raises(MpkError, match="MPKIR_KERNEL_PAGES='yes': expected 0 or 1"):
        make_backend(loaded, "gpu", gpu_backend="resident")
    with pytest.raises(MpkError, match="unknown GPU backend"):
        make_backend(loaded, "gpu", gpu_backend="nope")


@pytest.mark.parametrize("verb", ["generate", "serve"])
def test_kernel_switches_on_the_command_line(verb, monkeypatch):
    """``--[no-]kernel-sampling`` / ``--[no-]kernel-pages`` / ``--numerics`` reach ``open_runner`` (unset:
    None, the backend's defaults; fast), and ``--help`` says the default."""
    from mpkir.cli import build_parser

    parser = build_parser()
    args = parser.parse_args([verb, "--kernel-sampling", "--no-kernel-pages", "--numerics", "exact"])
    assert (args.kernel_sampling, args.kernel_pages, args.numerics) == (True, False, "exact")
    args = parser.parse_args([verb])
    assert (args.kernel_sampling, args.kernel_pages, args.numerics) == (None, None, "fast")
    sub = next(a for a in parser._actions if a.dest == "command").choices[verb]
    text = sub.format_help()
    assert "--no-kernel-sampling" in text and "$MPKIR_KERNEL_PAGES" in text


def test_a_graph_that_already_returns_logits_steps_to_the_same_logits(ckpt):
    """InterpreterBackend over the logits variant of a graph (what logits_module returns): float logits, the
    same as over the original graph (it used to cast them to integer ids)."""
    from mpkir.models.backends import logits_module
    from mpkir.verify import analyze

    m = load_model(ckpt["dir"], serve=SERVE, weight_dtype="f32")
    m2, changed = logits_module(m.module, m.analysis)
    assert changed and logits_module(m2, analyze(m2))[1] is False
    args = (np.array(ckpt["prompts"][0][:3], np.int32), np.arange(3, dtype=np.int32), np.zeros(3, np.int32),
            np.arange(4 * 8, dtype=np.int32).reshape(4, 8))
    a = InterpreterBackend(m.module, m.analysis, m.weights).step(*args)
    b = InterpreterBackend(m2, analyze(m2), m.weights).step(*args)
    assert b.dtype == np.float32 and np.array_equal(a, b) and np.abs(b).max() > 0
