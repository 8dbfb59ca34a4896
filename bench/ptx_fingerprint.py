"""Fingerprints of the default plans' PTX (nvcc, sm_90a, comments dropped): a device-code refactor that
means to leave the default kernels as they were shows the same fingerprints, without a GPU. Even a register
renumbering in the PTX can move the SASS schedule (2026-12-05: +10 % ms/step at batch 1, see RESULTS).

    python bench/ptx_fingerprint.py OUT.json [--against OLD.json]     (exit 1 when any differs)
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mpkir.codegen.emit import emit_cuda
from mpkir.codegen.lower import lower
from mpkir.parser import parse
from mpkir.testing.nvcc import nvcc_sm90a

CASES = [("llama3_2_1b", 1), ("llama3_2_1b", 8), ("qwen3_0_6b", 1), ("qwen3_0_6b", 8), ("qwen3_8b", 1),
         ("qwen3_8b", 8)]


def fingerprint(case: tuple[str, int]) -> tuple[str, str]:
    name, batch = case
    path = Path("examples") / f"{name}.mpk"
    src = emit_cuda(lower(parse(path.read_text(), str(path)), greedy=True, batch=batch))
    with tempfile.TemporaryDirectory() as d:
        r = nvcc_sm90a(src, Path(d), output="k.ptx", ptx=True)
        if r.returncode:
            raise SystemExit(f"{name} b{batch}: nvcc failed\n{r.stderr[-2000:]}")
        ptx = "\n".join(ln for ln in (Path(d) / "k.ptx").read_text().splitlines() if not ln.startswith("//"))
    return f"{name}/b{batch}", hashlib.sha256(ptx.encode()).hexdigest()[:16]


def main() -> int:
    out = sys.argv[1]
    with ThreadPoolExecutor(len(CASES)) as ex:
        prints = dict(ex.map(fingerprint, CASES))
    Path(out).write_text(json.dumps(prints, indent=1) + "\n")
    if "--against" not in sys.argv:
        print(json.dumps(prints, indent=1))
        return 0
    old = json.loads(Path(sys.argv[sys.argv.index("--against") + 1]).read_text())
    diff = [k for k in prints if old.get(k) != prints[k]]
    for k in prints:
        print(f"{k:16s} {'same' if k not in diff else 'DIFFERS'}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
