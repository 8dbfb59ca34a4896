"""An example's source with its token capacity resized, as the engine-scale benchmarks run it."""

from pathlib import Path


def sized_source(name: str, tokens: int) -> str:
    """``examples/NAME.mpk`` with max_requests and max_tokens (8 there) set to ``tokens`` and max_seq_len
    4096 -> 2048 (the KV cache of many requests fits beside the weights)."""
    src = (Path("examples") / f"{name}.mpk").read_text()
    for k in ("max_requests", "max_tokens"):
        assert f"const {k} = 8\n" in src, (name, k)
        src = src.replace(f"const {k} = 8\n", f"const {k} = {tokens}\n")
    return src.replace("const max_seq_len = 4096\n", "const max_seq_len = 2048\n")
