"""The one-process-per-GPU launcher with its CPU backend: N processes, each its rank's task graph, peer memory
and flags in shared memory; every rank's tokens equal the single-GPU interpreter's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mpkir.diagnostics import MpkError
from mpkir.interpreter import init_state, random_weights, run_graph
from mpkir.models.shard_launch import decode_inputs, launch, main
from mpkir.parser import parse
from mpkir.passes.tasks import prepare

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = {"vocab": 96, "hidden": 32, "layers": 2, "heads": 8, "kv_heads": 4, "head_dim": 8, "ffn": 48,
         "max_seq_len": 32, "page_size": 8, "max_tokens": 4, "max_requests": 2}


def source(name: str, n: int, small: bool = True) -> str:
    text = (EXAMPLES / name).read_text()
    if small:
        def sub(m):
            return f"const {m.group(1)} = {SMALL[m.group(1)]}" if m.group(1) in SMALL else m.group(0)
        text = re.sub(r"^const (\w+) = [0-9.e+-]+\s*$", sub, text, flags=re.M)
    return re.sub(r"serve \{", f"serve {{\n  gpus = {n}", text, count=1)


def reference(text: str, steps: int, seed: int):
    m = parse(text)
    mu, au = prepare(m)
    weights = random_weights(m, au, seed=seed)
    state = init_state(mu, au)
    return [run_graph(mu, x, weights, state, analysis=au, float_storage="f32")[0]
            for x in decode_inputs(mu, au, np.random.default_rng(seed), steps)]


@pytest.mark.parametrize(("name", "n"), [("qwen3_0_6b.mpk", 2), ("llama3_2_1b.mpk", 4)])
def test_processes_give_the_single_gpu_tokens(name, n):
    text = source(name, n)
    outs = launch(text, n, steps=3, seed=2, workers=3, timeout_s=120)
    ref = reference(text, 3, 2)
    assert len(outs) == n
    for rank_outs in outs:
        assert [o[0] for o in rank_outs] == [r.tolist() for r in ref]


def test_a_module_that_cannot_be_sharded_fails_before_any_process_starts():
    with pytest.raises(MpkError, match="2 does not divide 9"):
        launch(source("smollm2_135m.mpk", 2, small=False), 2)


def test_command_line(tmp_path, capsys):
    f = tmp_path / "mlp2.mpk"
    f.write_text(source("mlp.mpk", 2))
    assert main([str(f), "--gpus", "2", "--steps", "2", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ref = reference(f.read_text(), 2, 1)
    assert lines == [f"step {i}: " + " ".join(map(str, r.tolist())) for i, r in enumerate(ref)]
