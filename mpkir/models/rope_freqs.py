"""Llama-3 RoPE scaling as llama.cpp stores it: a table of per-frequency factors (``rope_freqs.weight``).

llama.cpp's converter does not keep Llama-3.1/3.2's ``rope_scaling`` parameters; it writes one factor per
rotary frequency, ``f_i = inv_i / inv'_i`` (the angle is ``pos · inv_i / f_i``): 1 for short wavelengths,
``factor`` for long ones and an interpolation between. The rope operator takes the four HF parameters
(``mpkir.ops.attention.rope_inv_freq``), so :func:`llama3_scaling_from_factors` recovers parameters that
reproduce the table and refuses a table they cannot reproduce; :func:`llama3_factors` writes one.
"""

from __future__ import annotations

import numpy as np

from mpkir.ops.attention import rope_inv_freq

TOLERANCE = 1e-5      # relative; the table is stored in float32
DEFAULT_ORIGINAL_MAX_POSITION = 8192   # Llama-3's pre-training context


def llama3_factors(rd: int, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_position: int) -> np.ndarray:
    """The ``rope_freqs`` table (float32, rd/2 entries) of these llama3 parameters."""
    plain = rope_inv_freq(rd, theta)
    scaled = rope_inv_freq(rd, theta, "llama3", factor, low_freq_factor, high_freq_factor,
                           original_max_position)
    return (plain / scaled).astype(np.float32)


def _reproduces(params: dict, factors: np.ndarray, rd: int, theta: float) -> bool:
    want = llama3_factors(rd, theta, **params).astype(np.float64)
    return bool(np.all(np.abs(want - factors) <= TOLERANCE * np.abs(factors)))


def _snapped(params: dict) -> dict:
    """The parameters rounded to 6 significant digits (1.0000001 -> 1.0)."""
    return {k: (v if isinstance(v, int) else float(f"{v:.6g}")) for k, v in params.items()}


def _band(slope: float, intercept: float, old: int) -> dict:
    """The parameters of the line s(1/λ) = slope / λ + intercept, s = old/(hi-lo) · (1/λ) - lo/(hi-lo)."""
    width = old / slope
    low = -intercept * width
    return {"low_freq_factor": low, "high_freq_factor": low + width, "original_max_position": old}


def _candidates(factors, wl, factor, original_max_position):
    """Parameter sets consistent with the table's interpolated entries (checked by the caller)."""
    tol = TOLERANCE
    kept = np.abs(factors - 1.0) <= tol
    divided = np.abs(factors - factor) <= tol * factor
    medium = ~(kept | divided)
    old = original_max_position
    # an interpolated entry's smoothing s = (1/f - 1/factor) / (1 - 1/factor) lies on a line in 1/λ
    s = (1.0 / factors[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)
    x = 1.0 / wl[medium]
    if medium.sum() >= 2:
        slope, intercept = np.polyfit(x, s, 1)
        if slope > 0:
            yield _band(slope, intercept, old)
    if medium.sum() == 1:
        # one point fixes one relation: first Llama-3's 1 and 4, solving for the original context ...
        s_m, x_m = float(s[0]), float(x[0])
        yield {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position": max(1, round((3.0 * s_m + 1.0) / x_m))}
        # ... else the least steep line through the point that keeps the kept entries at s >= 1, the
        # divided ones at s <= 0 and the low frequency factor positive (s < 0 at 1/λ = 0)
        slope = s_m / x_m
        if kept.any():
            slope = max(slope, (1.0 - s_m) / (float((1.0 / wl[kept]).min()) - x_m))
        if divided.any():
            slope = max(slope, s_m / (x_m - float((1.0 / wl[divided]).max())))
        slope *= 1.0 + 1e-6
        yield _band(slope, s_m - slope * x_m, old)
    if medium.sum() == 0 and kept.any() and divided.any():
        # no interpolated entry: put the band between the longest kept and the shortest divided wavelength
        hi_wl, lo_wl = float(wl[kept].max()), float(wl[divided].min())
        if hi_wl < lo_wl:
            yield {"low_freq_factor": old / (lo_wl * (1 - 1e-6)),
                   "high_freq_factor": old / (hi_wl * (1 + 1e-6)), "original_max_position": old}
    yield {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position": old}


def llama3_scaling_from_factors(factors, rd: int, theta: float,
                                original_max_position: int | None = None) -> dict | None:
    """HF ``rope_scaling`` keys (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``) that reproduce ``factors`` within :data:`TOLERANCE`;
    None for a table of ones (no scaling). Raises ValueError, saying why, for any other table."""
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    if f.shape[0] != rd // 2:
        raise ValueError(f"{f.shape[0]} factors for a rotary dimension of {rd} (expected {rd // 2})")
    if not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise ValueError("factors must be finite and positive")
    if np.all(np.abs(f - 1.0) <= TOLERANCE):
        return None
    factor = float(f.max())
    if np.any(f < 1.0 - TOLERANCE):
        raise ValueError(f"a factor below 1 ({float(f.min()):.6g}): llama3 scaling only slows "
                         "frequencies down")
    wl = 2.0 * np.pi / rope_inv_freq(rd, theta)
    if np.any(np.diff(f) < -TOLERANCE * factor):
        raise ValueError("factors do not grow with the wavelength, as llama3 scaling's do")
    old = int(original_max_position or DEFAULT_ORIGINAL_MAX_POSITION)
    for cand in _candidates(f, wl, factor, old):
        lo, hi = cand["low_freq_factor"], cand["high_freq_factor"]
        if not (0 < lo < hi) or cand["original_max_position"] <= 0:
            continue
        for params in (_snapped({"factor": factor, **cand}), {"factor": factor, **cand}):
            if _reproduces(params, f, rd, theta):
                return {"factor": params["factor"], "low_freq_factor": params["low_freq_factor"],
                        "high_freq_factor": params["high_freq_factor"],
                        "original_max_position_embeddings": params["original_max_position"]}
    raise ValueError("no llama3 parameters (factor, low/high frequency factors, original context) "
                     f"reproduce these {rd // 2} factors within {TOLERANCE:g}")
