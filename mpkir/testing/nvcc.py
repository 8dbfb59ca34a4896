"""Compile generated CUDA with ``nvcc`` for Hopper (``sm_90a``): the check that CI runs without a GPU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

NVCC = shutil.which("nvcc")
SM90A = ("-gencode", "arch=compute_90a,code=sm_90a", "-std=c++17")


def nvcc_sm90a(
    src: str, workdir: Path, *, output: str = "k.o", ptx: bool = False, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Write ``src`` to ``workdir/k.cu`` and compile it to an object (or PTX) named ``output``.

    Returns the finished process (``returncode``, ``stderr``); callers assert on it.
    """
    if NVCC is None:
        raise FileNotFoundError("nvcc is not installed")
    cu = Path(workdir) / "k.cu"
    cu.write_text(src)
    cmd = [NVCC, *SM90A, "-ptx" if ptx else "-c", str(cu), "-o", str(Path(workdir) / output)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir)
