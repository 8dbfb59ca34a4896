"""The command line: exit codes, messages, atomic writes, --help for every verb, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import mpkir
from mpkir.cli import build_parser, main
from mpkir.comments import scan_layout
from mpkir.parser import parse
from mpkir.printer import print_module

GOOD = """model "cli"
const hidden = 16   // a comment the formatter keeps
const layers = 2
dim B <= 4
weight w[l < layers] : bf16[hidden, hidden] = "layers.{l}.w"
graph main(%x: bf16[B, hidden]) -> (bf16[B, hidden]) {
  %y = for l in 0..layers carry(%h = %x) {
    %a = linear(%h, @w[l])
    %b = add(%a, %h)
    yield %b
  }
  return %y
}
"""

# three independent errors on lines 6, 7 and 8
BAD = """const hidden = 16
dim B <= 4
weight w : bf16[hidden, hidden] = "w"
weight v : bf16[8, 8] = "v"
graph main(%x: bf16[B, hidden]) -> (bf16[B, hidden]) {
  %a = linear(%x, @missing)
  %b = add(%a, %nope)
  %c = linear(%x, @v)
  return %c
}
"""


def _write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(text)
    return p


def _verbs() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


def _py(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mpkir", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


# ------------------------------------------------------------------------------------------ top level


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mpkir {mpkir.__version__}"


def test_verbs_are_discovered():
    assert {"check", "fmt", "opt", "run"} <= set(_verbs())


@pytest.mark.parametrize("verb", ["check", "fmt", "opt", "run"])
def test_help_for_every_verb(verb, capsys):
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mpkir {verb}")


def test_help_for_every_discovered_verb(capsys):
    for verb in _verbs():
        assert main([verb, "--help"]) == 0, verb
        assert f"usage: mpkir {verb}" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys, tmp_path):
    assert main([]) == 2
    assert "required" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["check"]) == 2
    f = _write(tmp_path, "good.mpk", GOOD)
    assert main(["fmt", str(f), "-i", "-o", "x.mpk"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_internal_error_is_exit_3_with_hint(monkeypatch, tmp_path, capsys):
    import mpkir.commands.check as check

    def boom(path):
        raise ZeroDivisionError("kaboom")

    monkeypatch.setattr(check, "check_file", boom)
    f = _write(tmp_path, "good.mpk", GOOD)
    assert main(["check", str(f)]) == 3
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: kaboom" in err and "--traceback" in err
    assert "Traceback" not in err
    assert main(["--traceback", "check", str(f)]) == 3
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ check


def test_check_clean_prints_nothing(tmp_path, capsys):
    f = _write(tmp_path, "good.mpk", GOOD)
    assert main(["check", str(f)]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_check_prints_every_error_with_caret(tmp_path, capsys):
    f = _write(tmp_path, "bad.mpk", BAD)
    assert main(["check", str(f)]) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert f"{f}:6:19: error: undefined weight or state '@missing'" in lines
    assert f"{f}:7:16: error: undefined value '%nope'" in lines
    located = [x for x in lines if x.startswith(f"{f}:8:")]
    assert len(located) == 1 and "linear" in located[0]
    assert "bf16[B, 16]" in located[0] and "[8, 8]" in located[0]
    # each error is followed by its source line in a gutter and a caret under the span
    i = lines.index(f"{f}:6:19: error: undefined weight or state '@missing'")
    assert lines[i + 1] == "    6 |   %a = linear(%x, @missing)"
    assert lines[i + 2] == "      |                   ^~~~~~~~"


def test_check_syntax_error_and_missing_file(tmp_path, capsys):
    f = _write(tmp_path, "syntax.mpk", GOOD.replace("%a = linear(%h, @w[l])", "%a = linear(%h @w[l])"))
    assert main(["check", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}:8:20: error: syntax error: unexpected '@w'" in err
    assert "^" in err
    assert main(["check", str(tmp_path / "absent.mpk")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_check_several_files_and_stdin(tmp_path, capsys, monkeypatch):
    good = _write(tmp_path, "good.mpk", GOOD)
    bad = _write(tmp_path, "bad.mpk", BAD)
    assert main(["check", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and str(good) not in err
    empty = _write(tmp_path, "empty.mpk", "// nothing here\n")
    assert main(["check", str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{empty}:") and "no graph" in err
    from mpkir.cli import render_error
    from mpkir.diagnostics import Diagnostic, MpkError

    assert render_error(MpkError(Diagnostic("boom")), "x.mpk") == "x.mpk: error: boom"  # unlocated: named
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(BAD))
    assert main(["check", "-"]) == 1
    assert "<stdin>:6:19: error" in capsys.readouterr().err


def _mutants(text: str):
    """Deterministic damage: truncations, deleted and doubled characters, swapped tokens."""
    n = len(text)
    for i in range(1, n, max(1, n // 25)):
        yield text[:i]
        yield text[:i] + text[i + 1:]
        yield text[:i] + text[i] + text[i:]
    for a, b in [("linear", "lienar"), ("%h", "%hh"), ("16", "-1"), ("bf16", "bf17"), ("yield %b", "yield"),
                 ("0..layers", "layers..0"), ("return %y", ""), ("}", ""), ("@w[l]", "@w")]:
        yield text.replace(a, b, 1)


def test_check_never_crashes_on_damaged_input(tmp_path, capsys):
    for i, text in enumerate(_mutants(GOOD)):
        f = _write(tmp_path, f"m{i}.mpk", text)
        rc = main(["check", str(f)])
        err = capsys.readouterr().err
        assert rc in (0, 1), (text, err)
        assert "Traceback" not in err and "internal error" not in err
        if rc == 1:
            assert f"{f}:" in err or "error:" in err


# ------------------------------------------------------------------------------------------ fmt


def test_fmt_prints_canonical_text(tmp_path, capsys):
    f = _write(tmp_path, "good.mpk", GOOD)
    assert main(["fmt", str(f)]) == 0
    out = capsys.readouterr().out
    assert out == print_module(parse(GOOD), scan_layout(GOOD))
    assert "const hidden = 16  // a comment the formatter keeps\n" in out
    assert parse(out) == parse(GOOD)
    g = _write(tmp_path, "canon.mpk", out)
    assert main(["fmt", str(g)]) == 0
    assert capsys.readouterr().out == out  # printing is a fixpoint


def test_fmt_in_place_and_check(tmp_path, capsys):
    f = _write(tmp_path, "good.mpk", GOOD)
    os.chmod(f, 0o640)
    assert main(["fmt", "--check", str(f)]) == 1
    assert "not in canonical form" in capsys.readouterr().err
    assert main(["fmt", "-i", str(f)]) == 0
    assert capsys.readouterr().out == ""
    assert f.read_text() == print_module(parse(GOOD), scan_layout(GOOD))
    assert "// a comment the formatter keeps" in f.read_text()
    assert (os.stat(f).st_mode & 0o777) == 0o640  # the file keeps its permissions
    assert main(["fmt", "--check", str(f)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.mpk"]  # no temp files left


def test_fmt_in_place_leaves_a_bad_file_alone(tmp_path, capsys):
    broken = GOOD.replace("yield %b", "yield %b,")
    f = _write(tmp_path, "broken.mpk", broken)
    assert main(["fmt", "-i", str(f)]) == 1
    assert "syntax error" in capsys.readouterr().err
    assert f.read_text() == broken
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.mpk"]


def test_fmt_output_file(tmp_path, capsys):
    f = _write(tmp_path, "good.mpk", GOOD)
    out = tmp_path / "out.mpk"
    assert main(["fmt", str(f), "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert out.read_text() == print_module(parse(GOOD), scan_layout(GOOD))
    assert main(["fmt", str(f), "-o", str(tmp_path / "no" / "such" / "dir.mpk")]) == 1
    assert "cannot write" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ opt


def test_opt_default_emits_mpk(tmp_path, capsys):
    f = _write(tmp_path, "good.mpk", GOOD)
    assert main(["opt", str(f)]) == 0
    assert capsys.readouterr().out == print_module(parse(GOOD))


def test_opt_pipeline_print_ir_after_all_and_timing(tmp_path, capsys):
    f = _write(tmp_path, "good.mpk", GOOD)
    out = tmp_path / "out.mpk"
    rc = main(["opt", str(f), "-p", "unroll,dce,infer-shapes", "--print-ir-after-all", "--timing",
               "-o", str(out)])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.out == ""
    for name in ("unroll", "dce", "infer-shapes"):
        assert f"// -----// IR Dump After {name} //----- //" in cap.err
    assert "Execution time report" in cap.err and "Total" in cap.err
    text = out.read_text()
    assert " for " not in text
    assert "%a.0 = linear(%x, @w[0]) : bf16[B, 16]" in text
    assert "%b.1 = add(%a.1, %b.0) : bf16[B, 16]" in text
    assert "return %b.1" in text


def test_opt_print_ir_before_and_selected(tmp_path, capsys):
    f = _write(tmp_path, "good.mpk", GOOD)
    assert main(["opt", str(f), "-p", "unroll,dce,infer-shapes", "--print-ir-before", "unroll",
                 "--print-ir-after", "dce"]) == 0
    banners = [x for x in capsys.readouterr().err.splitlines() if x.startswith("// -----// IR Dump")]
    assert banners == ["// -----// IR Dump Before unroll //----- //",
                       "// -----// IR Dump After dce //----- //"]
    assert main(["opt", str(f), "-p", "dce", "--print-ir-before-all"]) == 0
    assert "// -----// IR Dump Before dce //----- //" in capsys.readouterr().err
    assert main(["opt", str(f), "-p", "dce", "--print-ir-after", "nosuch"]) == 2
    assert "unknown pass 'nosuch'" in capsys.readouterr().err


def test_opt_long_flag_and_dump_pipeline(tmp_path, capsys):
    f = _write(tmp_path, "good.mpk", GOOD)
    assert main(["opt", str(f), "--passes", "infer-shapes{keep-written}", "--dump-pass-pipeline"]) == 0
    assert "infer-shapes{keep-written=true}" in capsys.readouterr().err


def test_opt_bad_pipeline_is_a_usage_error(tmp_path, capsys):
    f = _write(tmp_path, "good.mpk", GOOD)
    assert main(["opt", str(f), "-p", "unroll,nosuch"]) == 2
    err = capsys.readouterr().err
    assert "mpkir opt: error: unknown pass 'nosuch'" in err
    assert "valid passes:" in err and "unroll" in err and "fold-constants" in err
    assert main(["opt", str(f), "-p", "dce{bogus=1}"]) == 2
    assert "has no option 'bogus'" in capsys.readouterr().err


def test_opt_rejects_invalid_input_without_writing(tmp_path, capsys):
    f = _write(tmp_path, "bad.mpk", BAD)
    out = tmp_path / "out.mpk"
    assert main(["opt", str(f), "-p", "unroll", "-o", str(out)]) == 1
    assert "undefined value '%nope'" in capsys.readouterr().err
    assert not out.exists()


def test_opt_emitters_and_list_passes(tmp_path, capsys):
    from mpkir.emitters import discover

    emitters = discover()
    assert "mpk" in emitters
    f = _write(tmp_path, "good.mpk", GOOD)
    assert main(["opt", str(f), "--emit-mpk"]) == 0
    assert capsys.readouterr().out == print_module(parse(GOOD))
    assert main(["opt", str(f), "--emit", "nosuch"]) == 2
    assert "unknown emitter 'nosuch'" in capsys.readouterr().err
    assert main(["opt", "--help"]) == 0
    help_text = capsys.readouterr().out
    for name in emitters:
        assert f"--emit-{name}" in help_text
    assert main(["opt", "--list-passes"]) == 0
    listing = capsys.readouterr().out
    for name in ("verify", "infer-shapes", "unroll", "dce", "fold-constants"):
        assert name in listing


# ------------------------------------------------------------------------------------------ run


def test_run_usage_errors(tmp_path, capsys):
    f = _write(tmp_path, "good.mpk", GOOD)
    assert main(["run", str(f), "--tokens", "1,x"]) == 2
    assert main(["run", str(f), "--device", "tpu"]) == 2
    assert main(["run", str(f), "--device", "gpu", "--numerics", "fp8"]) == 2
    assert main(["run", str(f), "--inputs", "a.npz", "--tokens", "1"]) == 2
    capsys.readouterr()


def test_run_bad_input_is_a_diagnostic(tmp_path, capsys):
    pytest.importorskip("mpkir.interpreter")
    f = _write(tmp_path, "bad.mpk", BAD)
    assert main(["run", str(f)]) == 1
    assert "undefined value '%nope'" in capsys.readouterr().err


def test_run_prints_and_saves_outputs(tmp_path, capsys):
    pytest.importorskip("mpkir.interpreter")
    f = _write(tmp_path, "good.mpk", GOOD)
    save = tmp_path / "out.npz"
    assert main(["run", str(f), "--seed", "3", "--dim", "B=3", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "input %x:" in out and "%y:" in out and "[3, 16]" in out
    with np.load(save) as z:
        y = z["y"]
    assert y.shape == (3, 16) and y.dtype == np.float32 and np.all(np.isfinite(y))
    assert np.abs(y).max() > 0
    # the same seed gives the same outputs; given inputs are used
    x = np.random.default_rng().standard_normal((2, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(f), "--inputs", str(tmp_path / "in.npz"), "--save", str(tmp_path / "o2.npz"),
                 "-q"]) == 0
    assert capsys.readouterr().out == ""
    with np.load(tmp_path / "o2.npz") as z:
        assert z["y"].shape == (2, 16)


def test_run_weights_file_is_checked(tmp_path, capsys):
    pytest.importorskip("mpkir.interpreter")
    f = _write(tmp_path, "good.mpk", GOOD)
    np.savez(tmp_path / "w.npz", **{"layers.0.w": np.ones((16, 16), np.float32),
                                    "layers.1.w": np.ones((8, 16), np.float32)})
    assert main(["run", str(f), "--weights", str(tmp_path / "w.npz")]) == 1
    err = capsys.readouterr().err
    assert "'layers.1.w' has shape [8, 16]" in err


# ------------------------------------------------------------------------------------------ subprocess


def test_python_dash_m(tmp_path):
    good = _write(tmp_path, "good.mpk", GOOD)
    bad = _write(tmp_path, "bad.mpk", BAD)
    r = _py("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mpkir {mpkir.__version__}"
    r = _py("check", good)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = _py("check", bad)
    assert r.returncode == 1 and "error: undefined value '%nope'" in r.stderr
    assert "Traceback" not in r.stderr
    r = _py("opt", good, "-p", "unroll")
    assert r.returncode == 0 and "%b.1 = add(%a.1, %b.0)" in r.stdout
    r = _py("opt", good, "-p", "bogus")
    assert r.returncode == 2 and "valid passes" in r.stderr and "Traceback" not in r.stderr
    r = _py()
    assert r.returncode == 2 and "usage: mpkir" in r.stderr
    for verb in _verbs():
        r = _py(verb, "--help")
        assert r.returncode == 0 and f"usage: mpkir {verb}" in r.stdout, verb
