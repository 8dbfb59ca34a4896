"""SmolLM2-135M on the GPU step backend vs the CPU path's tokens computed in advance.

    python bench/smollm2_gpu_check.py GGUF OUT.json [--batch N]

Runs ``python -m mpkir generate --device gpu`` on the prompts of ``bench/smollm2_prompts.txt`` (64 greedy
tokens, --ignore-eos, batch 3 by default) and compares each prompt's tokens with
``bench/smollm2_cpu_tokens.json`` (the CPU interpreter at --precision bf16, computed without a GPU).
Prints, per prompt, how many leading tokens agree; writes everything to OUT.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


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
    summary = {"wall_s": round(wall, 2), "stats": got["stats"], "rows": rows, "stderr": r.stderr[-2000:]}
    Path(out).write_text(json.dumps(summary, indent=1))
    print("stats:", json.dumps(got["stats"]))
    return 0 if all(x["agree"] == x["of"] for x in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
