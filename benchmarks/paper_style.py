"""The paper-style analysis a researcher writes by hand, for comparison: load each shard pair
with safetensors, Δ in bf16 with torch, count ``~(|Δ| <= 1e-5)``. Prints the changed count.

    python benchmarks/paper_style.py PAIR_DIR      # PAIR_DIR/base and PAIR_DIR/tuned
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def count(root: Path) -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    changed = 0
    for shard in sorted((root / "base").glob("*.safetensors")):
        b = load_file(str(shard))
        t = load_file(str(root / "tuned" / shard.name))
        for k in b:
            changed += int((~((t[k] - b[k]).abs() <= 1e-5)).sum())
        del b, t
        gc.collect()
    return changed


if __name__ == "__main__":
    print(count(Path(sys.argv[1])))
