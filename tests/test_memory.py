"""A tensor much larger than the chunk size is processed in bounded memory."""

from __future__ import annotations

import tracemalloc

import torch

from builders import write_checkpoint
from raydiff.run.execute import Executor, RunContext
from raydiff.kernel.diff import Criteria
from raydiff.options import DiffOptions
from raydiff.plan import make_plan
from raydiff.inputs.refs import resolve


def test_unit_memory_is_bounded_by_chunk_not_tensor(tmp_path):
    n_rows, n_cols = 4096, 4096  # 16 Mi elements: 32 MiB per side in bf16
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n_rows, n_cols, generator=g).bfloat16()
    tuned = base.clone()
    sel = torch.rand(n_rows, n_cols, generator=g) < 0.2
    tuned[sel] = (tuned[sel].float() * 1.01).bfloat16()
    write_checkpoint(tmp_path / "b", {"w": base})
    write_checkpoint(tmp_path / "t", {"w": tuned})
    del base, tuned, sel
    chunk = 1 << 18  # 256 Ki elements
    plan = make_plan(resolve(str(tmp_path / "b")), resolve(str(tmp_path / "t")), DiffOptions(chunk_elems=chunk, rank="off"))
    assert len(plan.units) == n_rows * n_cols // chunk
    ex = Executor(RunContext("0" * 20, str(tmp_path / "store"), Criteria(), "off", 32, 128))
    ex.unit(plan.units[0])  # loads the compiled kernel once: a constant, not per-unit, cost
    tracemalloc.start()
    for u in plan.units[1:]:
        ex.unit(u)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    chunk_bytes = chunk * 2 * 2  # both sides, bf16
    tensor_bytes = n_rows * n_cols * 2 * 2
    print(f'peak traced {peak / 2**20:.1f} MiB for {chunk_bytes / 2**20:.1f} MiB units')
    assert peak < 2 * chunk_bytes, peak  # numpy buffers of one unit, whatever the tensor size
    assert peak < tensor_bytes / 5, peak
