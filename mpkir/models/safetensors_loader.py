"""HuggingFace-layout checkpoints: ``config.json`` + ``*.safetensors`` (single file or sharded).

Tensors are opened through the ``safetensors`` package with the NumPy framework (bf16 arrives as
ml-dtypes' bfloat16); shapes are read from the headers, so a mismatch is reported before any data
is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mpkir.diagnostics import error


def _require_safetensors():
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise error("reading .safetensors needs the 'safetensors' package: pip install -e '.[models]'") from e
    return safe_open


class SafetensorsSource:
    """Every tensor of the ``.safetensors`` files of a checkpoint directory (or one file)."""

    def __init__(self, path: str | Path):
        p = Path(path)
        if p.is_dir():
            index = p / "model.safetensors.index.json"
            if index.exists():
                wm = json.loads(index.read_text())["weight_map"]
                files = sorted({p / f for f in wm.values()})
            else:
                files = sorted(p.glob("*.safetensors"))
            if not files:
                raise error(f"no .safetensors files in {p}")
        elif p.exists():
            files = [p]
        else:
            raise error(f"checkpoint {p} does not exist")
        safe_open = _require_safetensors()
        self.files = files
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._handles: dict[Path, object] = {}
        for f in files:
            h = safe_open(str(f), framework="numpy")
            self._handles[f] = h
            for k in h.keys():  # noqa: SIM118 - safe_open is not iterable
                if k in self._where:
                    raise error(f"tensor '{k}' is in both {self._where[k].name} and {f.name}")
                self._where[k] = f
                self._shapes[k] = tuple(int(x) for x in h.get_slice(k).get_shape())

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def load(self, name: str) -> np.ndarray:
        return self._handles[self._where[name]].get_tensor(name)


def read_config(path: str | Path) -> dict:
    """``config.json`` of a checkpoint directory (or of the directory holding a .safetensors file)."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    cfg = d / "config.json"
    if not cfg.exists():
        raise error(f"{d} has no config.json: the model sizes come from it")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{cfg}: invalid JSON: {e}") from e


def save_checkpoint(path: str | Path, tensors: dict[str, np.ndarray], config: dict | None = None) -> None:
    """Write ``model.safetensors`` (+ ``config.json``) into a directory (tests, converted models)."""
    from safetensors.numpy import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tmp = p / "model.safetensors.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    tmp.replace(p / "model.safetensors")
    if config is not None:
        tmpc = p / "config.json.tmp"
        tmpc.write_text(json.dumps(config, indent=2))
        tmpc.replace(p / "config.json")
