"""The ``verify`` pass: run the verifier and stop the pipeline with every error found."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpkir import ir
from mpkir.verify import verify


@dataclass(frozen=True)
class Verify:
    """Check the module (names, arity, attributes, shapes, serve config); raise on any error."""

    name: ClassVar[str] = "verify"

    def run(self, module: ir.Module) -> ir.Module:
        verify(module)
        return module
