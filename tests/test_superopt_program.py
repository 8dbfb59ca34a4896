"""Block programs: text round trip, interpreter (any legal grid/loop) against the kernel-level target,
the superopt pass (merged linears) through the NumPy interpreter, and CUDA emission compiled by nvcc."""

import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpkir.passes.superopt import interp
from mpkir.passes.superopt import search as S
from mpkir.passes.superopt.cuda import emit_task_module
from mpkir.passes.superopt.domains import Float
from mpkir.passes.superopt.program import ProgramError, parse_fused, print_fused
from mpkir.passes.superopt.targets import Subgraph, inputs_of, target

STRUCT = S.dfs(Subgraph("norm_linear", (), (("M", 2), ("K", 8), ("N", 4)), (("eps", 1e-5),)))[0][0]


@given(
    st.sampled_from([1, 2, 3]),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 2**32 - 1),
)
def test_interpreter_matches_target_for_any_grid_and_loop(m, grid, loop, seed):
    sg = Subgraph("norm_linear", (), (("M", m), ("K", 16), ("N", 8)), (("eps", 1e-5),))
    f = S._concretize(sg, STRUCT, grid, loop)
    rng = np.random.default_rng(seed)
    ins = {n: rng.standard_normal(s) for n, s in inputs_of(sg).items()}
    got = interp.run_fused(f, ins, Float())["y"]
    ref = interp.run_program(target(sg), ins, Float())["y"]
    assert np.linalg.norm(got - ref) <= 1e-12 * np.linalg.norm(ref)


def test_text_roundtrip_and_errors():
    f = S.attention_program(
        Subgraph("decode_attention", (), (("G", 2), ("D", 4), ("N", 16)), (("scale", 0.5),)), 2, 2
    )
    text = print_fused(f)
    assert print_fused(parse_fused(text)) == text
    with pytest.raises(ProgramError):
        parse_fused("program p grid(2) loop(1) { in x: [3] imap(0) fmap(-1) }")
        interp.run_fused(
            parse_fused("program p grid(2) loop(1) { in x: [3] imap(0) fmap(-1) }"),
            {"x": np.ones(3)},
            Float(),
        )
    with pytest.raises(ProgramError):
        parse_fused("program p grid(2) {")


SMALL = """model "tiny-qkv"
const hidden = 16
dim B <= 4
serve { max_tokens = 4  mode = decode }
weight g : bf16[hidden] = "g"
weight wq : bf16[8, hidden] = "wq"
weight wk : bf16[4, hidden] = "wk"
weight wv : bf16[4, hidden] = "wv"
graph main(%x: bf16[B, hidden]) -> (bf16[B, 8], bf16[B, 4], bf16[B, 4]) {
  %xn = rmsnorm(%x, @g, eps=1e-5)
  %q = linear(%xn, @wq)
  %k = linear(%xn, @wk)
  %v = linear(%xn, @wv)
  return %q, %k, %v
}
"""


def test_pass_merges_qkv_and_stays_equal(tmp_path):
    from mpkir.interpreter import init_state, random_weights, run_graph
    from mpkir.parser import parse
    from mpkir.passes.superopt.superopt_pass import Superopt
    from mpkir.printer import print_module
    from mpkir.verify import analyze

    m = parse(SMALL)
    out = Superopt(cache_dir=str(tmp_path), search=False).run(m)
    text = print_module(out)
    assert "concat(@wq, @wk, @wv, axis=0)" in text and "split(" in text and text.count("linear(") == 1
    a0, a1 = analyze(m), analyze(out)
    assert a1.ok, a1.diagnostics
    w = random_weights(m, a0, seed=3)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    r0 = run_graph(m, {"x": x}, w, init_state(m, a0), float_storage="f32")
    r1 = run_graph(out, {"x": x}, w, init_state(out, a1), float_storage="f32")
    for u, v in zip(r0, r1, strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        assert np.linalg.norm(u - v) <= 1e-5 * np.linalg.norm(u)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_emitter_compiles_for_sm90a(tmp_path):
    progs = [
        S._concretize(
            Subgraph("norm_linear", (), (("M", 4), ("K", 256), ("N", 128)), (("eps", 1e-5),)), STRUCT, 8, 4
        ),
        S.attention_program(
            Subgraph("decode_attention", (), (("G", 2), ("D", 32), ("N", 256)), (("scale", 0.17),)), 4, 2
        ),
        S.headnorm_rope_program(
            Subgraph("headnorm_rope", (), (("T", 2), ("Hh", 4), ("D", 64)), (("eps", 1e-6),)), "token_head"
        ),
    ]
    src, bodies = emit_task_module([(f"p{i}_", f) for i, f in enumerate(progs)])
    assert len(bodies) == 4 and all("blockIdx" not in b.source for b in bodies)
    assert "__device__ void mk_so_p1_attn_merge(const MkTask& t" in src
    cu = tmp_path / "superopt.cu"
    cu.write_text(src)
    r = subprocess.run(
        [
            "nvcc",
            "-gencode",
            "arch=compute_90a,code=sm_90a",
            "-c",
            str(cu),
            "-o",
            str(tmp_path / "superopt.o"),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert r.returncode == 0, r.stderr


def test_pass_registered_and_cli_report(tmp_path):
    from mpkir.passes.manager import make_pass

    assert make_pass("superopt").name == "superopt"
    src = tmp_path / "m.mpk"
    src.write_text(SMALL)
    r = subprocess.run(
        [
            "python",
            "-m",
            "mpkir",
            "superopt",
            str(src),
            "--report",
            "--budget",
            "20s",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert r.returncode == 0, r.stderr
    assert "norm_linear" in r.stdout and "Z3 proved" in r.stdout and "explored" in r.stdout
    assert "hand-written: mk_linear mode 1" in r.stdout and "decision: " in r.stdout
