"""SmolLM2-135M on the GPU step backend vs the CPU path's tokens computed in advance.

    python bench/smollm2_gpu_check.py GGUF OUT.json [--batch N]

Runs ``python -m mpkir generate --device gpu`` on the prompts of ``bench/smollm2_prompts.txt`` (64 greedy
tokens, --ignore-eos, batch 3 by default) and compares each prompt's tokens with
``bench/smollm2_cpu_tokens.json`` (the CPU interpreter at --precision bf16, computed without a GPU).
Prints, per prompt, how many leading tokens agree; writes everything to OUT.json.

Then the tie-aware check: the CPU interpreter, teacher forced on the GPU's own tokens, must rank each of them
within one bf16 ulp of its maximum logit (bf16 logits tie often at one ulp; a summation order alone decides
those). Exit status 0 when every GPU token passes it, 2 otherwise (1: generate failed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bf16_ulp(x: float) -> float:
    """One bf16 ulp at |x| (8 significant bits)."""
    import math

    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0**-133


def tie_check(loaded, prompt_ids: list[int], tokens: list[int], chunk: int = 8) -> dict:
    """The CPU interpreter teacher forced on ``prompt_ids + tokens``: at each generated step, how far below
    its maximum logit it puts the given token, in bf16 ulps of that maximum; the first step over one ulp."""
    import numpy as np

    from mpkir.models.backends import InterpreterBackend

    be = InterpreterBackend(loaded.module, loaded.analysis, loaded.weights)
    ids = list(prompt_ids) + list(tokens)
    pps = int(loaded.serve.max_seq_len) // int(loaded.serve.page_size)
    table = np.arange(int(loaded.serve.max_requests) * pps, dtype=np.int32).reshape(-1, pps)
    rows = []
    for c0 in range(0, len(ids) - 1, chunk):
        ch = ids[c0:min(c0 + chunk, len(ids) - 1)]
        lg = be.step(np.array(ch, np.int32), np.arange(c0, c0 + len(ch), dtype=np.int32),
                     np.zeros(len(ch), np.int32), table)
        rows.extend(np.asarray(lg, np.float64))
    n0 = len(prompt_ids)
    ulps = [float((r.max() - r[t]) / bf16_ulp(r.max())) for r, t in zip(rows[n0 - 1:], tokens, strict=True)]
    over = next((j for j, u in enumerate(ulps) if u > 1.0), -1)
    return {"max_ulps_below_top": max(ulps, default=0.0), "first_step_over_one_ulp": over,
            "steps_at_a_tie": sum(1 for u in ulps if 0 < u <= 1.0)}


def main() -> int:
    gguf, out = sys.argv[1], sys.argv[2]
    extra = sys.argv[3:]
    ref = json.loads((HERE / "smollm2_cpu_tokens.json").read_text())
    cmd = [
        sys.executable, "-m", "mpkir", "generate", "--model", gguf, "--device", "gpu",
        "--prompts", str(HERE / "smollm2_prompts.txt"), "--max-tokens", "64", "--ignore-eos", "--json",
        "--no-progress", *extra,
    ]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-6000:])
        return 1
    got = json.loads(r.stdout)
    rows = []
    for i, res in enumerate(got["results"]):
        want = ref["tokens"][i]
        pairs = zip(res["tokens"], want, strict=False)
        same = next((j for j, (a, b) in enumerate(pairs) if a != b), min(len(want), len(res["tokens"])))
        rows.append({"prompt": res["prompt"], "agree": same, "of": len(want), "text": res["text"]})
        print(f"prompt {i}: {same}/{len(want)} tokens equal to the CPU path; {res['text'][:70]!r}")
    from mpkir.models.loader import load_model

    loaded = load_model(gguf)
    for i, (res, row) in enumerate(zip(got["results"], rows, strict=True)):
        row["tokens"] = res["tokens"]
        row["tie_aware"] = tie_check(loaded, loaded.tokenizer.prompt_ids(ref["prompts"][i], chat=None),
                                     res["tokens"])
        print(f"prompt {i}: CPU interpreter teacher forced on the GPU tokens: {row['tie_aware']}")
    summary = {"wall_s": round(wall, 2), "stats": got["stats"], "rows": rows, "stderr": r.stderr[-2000:]}
    Path(out).write_text(json.dumps(summary, indent=1))
    print("stats:", json.dumps(got["stats"]))
    return 0 if all(x["tie_aware"]["first_step_over_one_ulp"] < 0 for x in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
