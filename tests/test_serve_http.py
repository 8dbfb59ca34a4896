"""The OpenAI-style HTTP endpoint on loopback: raw HTTP, SSE streaming, concurrency, the openai client."""

from __future__ import annotations

import http.client
import json
import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("tokenizers")

from mpkir.commands.serve_http import make_server
from mpkir.models.engine import Engine, EngineConfig, SamplingParams
from mpkir.models.reference import PagedReferenceBackend, ReferenceModel, random_checkpoint
from mpkir.models.tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    cfg = dict(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=tok.vocab_size,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    )
    model = ReferenceModel(random_checkpoint(cfg, seed=7), cfg)
    ec = EngineConfig(
        max_requests=3, max_tokens=16, page_size=8, num_pages=64, max_seq_len=128, stop_ids=tok.eos_token_ids
    )
    runner = SimpleNamespace(
        tokenizer=tok,
        engine=Engine(PagedReferenceBackend(model, 64, 8), ec),
        default_sampling=SamplingParams(),
        loaded=SimpleNamespace(module=SimpleNamespace(model_name="tiny-llama")),
    )
    srv, service = make_server(runner, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield SimpleNamespace(port=srv.server_address[1], tok=tok, model=model)
    srv.shutdown()
    srv.server_close()
    service.close()


def _post(port, path, body, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request(
        "POST",
        path,
        body=json.dumps(body) if not isinstance(body, bytes) else body,
        headers={"Content-Type": "application/json"},
    )
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def _expected(s, ids, n):
    out = s.model.greedy(ids, n, stop_ids=s.tok.eos_token_ids)
    return s.tok.decode(out), len(out)


def test_completion_and_stream_equal_greedy(server):
    s = server
    prompt = "What is the capital of France?"
    want, n = _expected(s, s.tok.encode(prompt), 12)
    st, data = _post(s.port, "/v1/completions", {"model": "tiny-llama", "prompt": prompt, "max_tokens": 12})
    assert st == 200
    obj = json.loads(data)
    assert obj["object"] == "text_completion" and obj["choices"][0]["text"] == want
    assert obj["usage"]["completion_tokens"] == n
    st, data = _post(s.port, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "stream": True})
    assert st == 200
    events = [line[6:] for line in data.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2  # streamed in pieces
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_completion(server):
    s = server
    msgs = [{"role": "user", "content": "Say hello"}]
    want, _ = _expected(s, s.tok.encode_chat(msgs), 10)
    st, data = _post(s.port, "/v1/chat/completions", {"messages": msgs, "max_tokens": 10})
    assert st == 200
    obj = json.loads(data)
    assert obj["object"] == "chat.completion"
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": want}


def test_concurrent_requests_each_get_their_own_tokens(server):
    s = server
    prompts = ["one two three", "the lazy dog", "def add(a, b):", "Paris is", "quick brown fox"]
    want = [_expected(s, s.tok.encode(p), 9)[0] for p in prompts]
    got = [None] * len(prompts)

    def go(i):
        st, data = _post(
            s.port, "/v1/completions", {"prompt": prompts[i], "max_tokens": 9, "stream": i % 2 == 0}
        )
        assert st == 200
        if i % 2:
            got[i] = json.loads(data)["choices"][0]["text"]
        else:
            ev = [
                x[6:] for x in data.decode().split("\n\n") if x.startswith("data: ") and x != "data: [DONE]"
            ]
            got[i] = "".join(json.loads(e)["choices"][0]["text"] for e in ev)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_errors(server):
    st, data = _post(server.port, "/v1/completions", b"{not json")
    assert st == 400 and "invalid JSON" in json.loads(data)["error"]["message"]
    st, data = _post(server.port, "/v1/nothing", {})
    assert st == 404
    st, data = _post(server.port, "/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert st == 400
    st, data = _post(server.port, "/v1/completions", {"prompt": "x", "top_p": 0})
    assert st == 400
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    c.request("GET", "/v1/models")
    assert json.loads(c.getresponse().read())["data"][0]["id"] == "tiny-llama"
    c.close()


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    s = server
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{s.port}/v1", api_key="unused", max_retries=0, timeout=60
    )
    want, _ = _expected(s, s.tok.encode("the lazy dog"), 8)
    r = client.completions.create(model="tiny-llama", prompt="the lazy dog", max_tokens=8, temperature=0)
    assert r.choices[0].text == want
    msgs = [{"role": "user", "content": "Say hello"}]
    want_chat, _ = _expected(s, s.tok.encode_chat(msgs), 8)
    stream = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == want_chat
    # seeded sampling is reproducible through the API
    a = client.completions.create(model="m", prompt="Paris is", max_tokens=8, temperature=1.0, seed=5)
    b = client.completions.create(model="m", prompt="Paris is", max_tokens=8, temperature=1.0, seed=5)
    assert a.choices[0].text == b.choices[0].text


def test_serve_compiled_tiny_checkpoint_with_openai_client(tmp_path):
    """The whole path: safetensors checkpoint -> sized example .mpk -> interpreter -> HTTP -> openai."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("mpkir.interpreter")
    from mpkir.models.runner import open_runner
    from mpkir.models.safetensors_loader import save_checkpoint

    tok = write_tiny_tokenizer(tmp_path)
    cfg = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, intermediate_size=96, vocab_size=tok.vocab_size,
               rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    w = random_checkpoint(cfg, seed=5)
    save_checkpoint(tmp_path, w, cfg)
    runner = open_runner(tmp_path, device="cpu", batch=2, step_tokens=32, max_seq_len=128)
    msgs = [{"role": "user", "content": "Say hello"}]
    want = tok.decode(ReferenceModel(w, cfg).greedy(tok.encode_chat(msgs), 6, stop_ids=tok.eos_token_ids))
    srv, service = make_server(runner, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="x",
                               max_retries=0, timeout=120)
        stream = client.chat.completions.create(model="qwen3", messages=msgs, max_tokens=6, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want
    finally:
        srv.shutdown()
        srv.server_close()
        service.close()
