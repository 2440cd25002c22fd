"""The safetensors dtypes raydiff reads: code, width, kind and the numpy dtype of the stored bits.

A fact every stage needs (header validation, planning, the kernel, the commit's statistics),
so it lives apart from all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its code, size, kind and the numpy dtype of its raw bits."""

    code: str
    itemsize: int
    kind: str  # "float", "int" or "bool"
    bits: str  # numpy dtype of the stored bits (unsigned int of the same width)

    @property
    def is_float(self) -> bool:
        return self.kind == "float"


DTYPES: Mapping[str, DType] = {
    d.code: d
    for d in (
        DType("F64", 8, "float", "<u8"),
        DType("F32", 4, "float", "<u4"),
        DType("F16", 2, "float", "<u2"),
        DType("BF16", 2, "float", "<u2"),
        DType("F8_E4M3", 1, "float", "u1"),
        DType("F8_E5M2", 1, "float", "u1"),
        DType("I64", 8, "int", "<u8"),
        DType("I32", 4, "int", "<u4"),
        DType("I16", 2, "int", "<u2"),
        DType("I8", 1, "int", "u1"),
        DType("U64", 8, "int", "<u8"),
        DType("U32", 4, "int", "<u4"),
        DType("U16", 2, "int", "<u2"),
        DType("U8", 1, "int", "u1"),
        DType("BOOL", 1, "bool", "u1"),
    )
}
