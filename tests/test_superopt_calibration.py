"""The superoptimizer's cost model against what the H100 measured (passes/superopt/calibration_h100.json, from
bench/superopt_h100.json and bench/superopt_mk_h100.json, 2026-11-25): at every measured shape the model
ranks the found program against the unfused ops and against the hand-written body as the GPU did, and so
applies none of them (finding and proving them is tested separately: test_superopt_search.py)."""

import json
from pathlib import Path

import pytest

from mpkir.passes.superopt import calibration as C
from mpkir.passes.superopt import search as S
from mpkir.passes.superopt.program import parse_fused

DATA = C.load()
PRED = C.predictions(DATA)
ROOT = Path(__file__).resolve().parents[1]


def _id(p):
    return f"{p['model']}-{p['kind']}-{'x'.join(str(v) for v in p['dims'].values())}"


def test_calibration_data_is_the_benchs():
    raw = json.loads((ROOT / "bench" / "superopt_h100.json").read_text())
    assert raw.get("date") == DATA["bench_date"], (
        "bench/superopt_h100.json was re-measured since the calibration: recalibrate from it"
    )
    bench = raw["rows"]
    assert len(bench) == len(DATA["bodies"]) == 12
    for b, d in zip(bench, DATA["bodies"], strict=True):
        assert (b["kind"], b["dims"], b["choice"]) == (d["kind"], d["dims"], d["choice"])
        assert b["found_us"] == pytest.approx(d["found_us"], rel=1e-3)
        assert b["unfused_us"] == pytest.approx(d["unfused_us"], rel=1e-3)


@pytest.mark.parametrize("p", PRED, ids=_id)
def test_predicted_times_within_1p5x_of_measured(p):
    assert 1 / 1.5 < p["found_pred_us"] / p["found_us"] < 1.5
    assert 1 / 1.5 < p["unfused_pred_us"] / p["unfused_us"] < 1.5


@pytest.mark.parametrize("p", PRED, ids=_id)
def test_found_vs_unfused_ranking_agrees(p):
    assert (p["unfused_pred_us"] > p["found_pred_us"]) == (p["unfused_us"] > p["found_us"])


@pytest.mark.parametrize("p", PRED, ids=_id)
def test_handwritten_beats_found_as_measured(p):
    """The hand-written body wins: its time at the rate the megakernel's hand-written bodies reached (ms/step
    fit) is below the found body's MEASURED time, and the model ranks them the same way."""
    assert p["handwritten_pred_us"] < p["found_us"]
    assert p["handwritten_pred_us"] < p["found_pred_us"]


@pytest.mark.parametrize("p", PRED, ids=_id)
def test_decision_is_not_applied_at_every_measured_shape(p):
    key = (p["model"], p["kind"], p["dims"])
    row = next(r for r in DATA["bodies"] if (r["model"], r["kind"], r["dims"]) == key)
    sg, gpu = C.subgraph(row), S.gpu_spec()
    r = S.Result(
        sg,
        parse_fused(row["program"]),
        S.cost(parse_fused(row["program"]), gpu),
        S.baseline_cost(sg, gpu),
        {},
        S.Stats(),
        handwritten=S.handwritten(sg, gpu),
    )
    applied, why = r.decision
    assert not applied and ("hand-written" in why or "<= 1" in why)


@pytest.mark.parametrize("model", ["qwen3_0_6b", "llama3_2_1b"])
def test_megakernel_slowdown_predicted(model):
    """Applying the found programs made the real megakernel slower; the model predicts a slowdown of the
    same size (within 2x) from the per-body costs and the extra ops."""
    measured, predicted = C.megakernel_delta(model, DATA)
    assert measured > 0 and predicted > 0
    assert 0.5 < predicted / measured < 2.0


def test_exported_programs_carry_the_calibrated_decisions():
    progs = json.loads((ROOT / "bench" / "superopt_programs.json").read_text())
    assert progs and all(e["version"] == S.VERSION for e in progs)
    gpu = S.gpu_spec()
    for e in progs:
        assert e["proof"]["finite_field"] and e["proof"]["z3"] == "proved"
        sg = C.subgraph(e)
        f = parse_fused(e["program"])
        found, hw = S.cost(f, gpu)["time_ns"] / 1000, S.handwritten(sg, gpu)["time_ns"] / 1000
        assert e["predicted_us"] == pytest.approx(found, rel=1e-6)
        assert e["handwritten"]["predicted_us"] == pytest.approx(hw, rel=1e-6)
        assert e["applied"] == (e["gain"] > 1.0 and found < hw)
