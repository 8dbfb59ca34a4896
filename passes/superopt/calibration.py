"""The H100 measurements the superoptimizer's cost model is calibrated on (``calibration_h100.json``: the
measured found programs with their bench numbers, copied from bench/superopt_h100.json, 2026-11-25 11:18 UTC,
and the megakernel runs of bench/superopt_megakernel_check.py, bench/superopt_mk_h100.json, 11:42 UTC), and
the model's predictions for the same programs, so a test can hold the model to what the GPU said."""

from __future__ import annotations

import json
from pathlib import Path

from mpkir.passes.superopt import search as S
from mpkir.passes.superopt.program import parse_fused
from mpkir.passes.superopt.targets import Subgraph

DATA = Path(__file__).with_name("calibration_h100.json")
MK_OP_NS = 6200.0  # one dependent op of the megakernel (ms/step fit of both models, see search.py)


def load(path: Path = DATA) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def subgraph(row: dict) -> Subgraph:
    return Subgraph(row["kind"], (), tuple(row["dims"].items()), tuple(row["consts"].items()))


def predictions(data: dict | None = None, gpu: S.GpuSpec | None = None) -> list[dict]:
    """Per measured body: measured and predicted µs of the found program, the unfused ops and the
    hand-written megakernel body (predicted only: measured as ms/step, see :func:`megakernel_delta`)."""
    data = data or load()
    gpu = gpu or S.gpu_spec()
    out = []
    for r in data["bodies"]:
        sg = subgraph(r)
        out.append(
            {
                **{k: r[k] for k in ("model", "kind", "dims", "found_us", "unfused_us")},
                "found_pred_us": S.cost(parse_fused(r["program"]), gpu)["time_ns"] / 1000,
                "unfused_pred_us": S.baseline_cost(sg, gpu)["time_ns"] / 1000,
                "handwritten_pred_us": S.handwritten(sg, gpu)["time_ns"] / 1000,
            }
        )
    return out


def megakernel_delta(model: str, data: dict | None = None, gpu: S.GpuSpec | None = None) -> tuple:
    """(measured, predicted) ms/step change of the megakernel when the found programs replaced its
    hand-written ops: Σ instances × (found − hand-written) + the extra ops × :data:`MK_OP_NS`."""
    data = data or load()
    mk = data["megakernel"][model]
    rows = [p for p in predictions(data, gpu) if p["model"] == model]
    pred_ns = 0.0
    for kind, n in mk["replaced"].items():
        per = [p for p in rows if p["kind"] == kind]
        # each measured shape of a kind stands for an equal share of its instances (q and k head norms)
        for p in per:
            pred_ns += n / len(per) * (p["found_pred_us"] - p["handwritten_pred_us"]) * 1000
    pred_ns += (mk["ops"][1] - mk["ops"][0]) * MK_OP_NS
    measured = mk["ms_per_step_found"] - mk["ms_per_step_handwritten"]
    return measured, pred_ns / 1e6
