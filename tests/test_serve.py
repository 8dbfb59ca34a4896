"""The serve block: schema, defaults, derived values and the checks that a configuration can work."""

from __future__ import annotations

import pytest

from mpkir.parser import parse
from mpkir.serve import SCHEMA, ServeConfig, serve_config
from mpkir.verify import analyze

GRAPH = "graph g(%x: f32[4]) -> (f32[4]) {\n  return %x\n}\n"


def config(body: str, consts: str = "") -> tuple[ServeConfig, list[str]]:
    a = analyze(parse(consts + "serve {\n" + body + "}\n" + GRAPH))
    return a.serve, [d.message for d in a.diagnostics]


def test_no_block_means_defaults():
    a = analyze(parse(GRAPH))
    assert a.serve == ServeConfig()


def test_every_setting_is_read():
    cfg, errs = config("max_requests = 2\nmax_tokens = 12\nmax_seq_len = 256\npage_size = 32\n"
                       "num_pages = 16\nmode = mixed\nsampling = greedy\ntemperature = 0.5\ntop_k = 40\n"
                       "top_p = 0.9\nseed = 7\nspeculative = ngram\nspec_k = 5\nngram = 2\ngpus = 2\n"
                       "target = h200\neos_token = 2\n")
    assert errs == []
    assert cfg == ServeConfig(2, 12, 256, 32, 16, "mixed", "greedy", 0.5, 40, 0.9, 7, "ngram", 5, 2, 2,
                              "h200", 2)
    assert cfg.pages_per_seq == 8
    assert {s.name for s in SCHEMA} == set(ServeConfig.__dataclass_fields__)


def test_derived_defaults():
    cfg, errs = config("max_requests = 3\nmax_seq_len = 100\npage_size = 10\n")
    assert errs == [] and cfg.max_tokens == 3 and cfg.num_pages == 30
    cfg, errs = config("max_requests = 2\nspeculative = ngram\nspec_k = 3\n")
    assert errs == [] and cfg.max_tokens == 8


def test_values_are_expressions_of_constants():
    cfg, errs = config("max_seq_len = seq\npage_size = seq / 4\nmax_requests = r\nnum_pages = r * 4\n",
                       "const seq = 64\nconst r = 2\n")
    assert errs == [] and (cfg.max_seq_len, cfg.page_size, cfg.num_pages) == (64, 16, 8)


@pytest.mark.parametrize("body,want", [
    ("max_requests = 0\n", ["serve: max_requests must be at least 1, got 0"]),
    ("spec_k = 0\n", ["serve: spec_k must be at least 1, got 0"]),
    ("ngram = -1\n", ["serve: ngram must be at least 1, got -1"]),
    ("num_pages = 0\n", ["serve: num_pages must be at least 1, got 0"]),
    ("top_p = 0\n", ["serve: top_p must be in (0, 1], got 0.0"]),
    ("top_k = -1\n", ["serve: top_k must be 0 (off) or positive, got -1"]),
    ("seed = -5\n", ["serve: seed must not be negative, got -5"]),
    ("eos_token = -2\n", ["serve: eos_token must be a token id or -1 (none), got -2"]),
    ("gpus = 6\n", ["serve: gpus must be a power of two, got 6"]),
    ("sampling = sample\ntemperature = 0\n",
     ["serve: temperature must be positive when sampling = sample, got 0"]),
    ("target = tpu\n", ["serve setting 'target': expected one of h100, h200, a100, b200, l40s, rtx4090"]),
    ("mode = 3\n", ["serve setting 'mode': expected one of decode, prefill, mixed"]),
    ("max_tokens = 1.5\n", ["serve setting 'max_tokens': expected an integer, got 1.5"]),
    ("top_p = true\n", ["serve setting 'top_p': expected a number"]),
    ("speculative = ngram\nspec_k = 4\nmax_seq_len = 4\npage_size = 4\n",
     ["serve: spec_k 4 draft tokens do not fit in max_seq_len 4"]),
    ("mode = prefill\nmax_requests = 2\nmax_tokens = 2\nspeculative = ngram\n", []),
])
def test_single_problems(body, want):
    assert config(body)[1] == want


def test_an_invalid_value_does_not_hide_the_others():
    # page_size is invalid, so its cross-checks are skipped; every other problem is still reported
    _, errs = config("page_size = 0\nmax_requests = 4\nmax_tokens = 2\ntop_p = 2\nnum_pages = 1\ngpus = 0\n")
    assert errs == [
        "serve: page_size must be at least 1, got 0",
        "serve: max_tokens 2 is fewer than max_requests 4",
        "serve: top_p must be in (0, 1], got 2.0",
        "serve: num_pages 1 is fewer than max_requests 4: every request needs at least one page",
        "serve: gpus must be at least 1, got 0",
    ]


def test_serve_config_without_block():
    from mpkir.semantics import Env

    assert serve_config(None, Env()) == (ServeConfig(), [])
