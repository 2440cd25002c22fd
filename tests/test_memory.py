"""A tensor much larger than the chunk size is processed in bounded memory."""

from __future__ import annotations

import dataclasses
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


def test_a_sketch_on_the_stored_bits_holds_what_the_local_backend_budgets_for_it(tmp_path):
    """The local backend runs spectra side by side while their estimates fit its budget: the
    estimate of a sketch that decodes neither side (``spectrum_memory``, ≈ 5 bytes an entry,
    not 16) must still cover what the task allocates (numpy's arrays, traced; ΔW included).
    The same matrix with the subspace metrics decodes both sides and is budgeted 16."""
    from raydiff.run.execute import spectrum_memory

    m, n = 2048, 4096
    g = torch.Generator().manual_seed(1)
    base = torch.randn(m, n, generator=g).bfloat16()
    tuned = (base.float() + torch.randn(m, n, generator=g) * 1e-2).bfloat16()
    write_checkpoint(tmp_path / "b", {"model.layers.0.mlp.up_proj.weight": base})
    write_checkpoint(tmp_path / "t", {"model.layers.0.mlp.up_proj.weight": tuned})
    b, t = resolve(str(tmp_path / "b")), resolve(str(tmp_path / "t"))
    bare = DiffOptions(rank="sketch", subspace_k=0)
    task = make_plan(b, t, bare).spectra[0]
    ctx = RunContext("ab" * 10, str(tmp_path / "store"), Criteria(), "sketch", 32, bare.sketch_rank, subspace_k=0)
    ex = Executor(ctx)
    ex.spectrum(task)  # compiled code loaded, and ΔW's reused buffer held, before tracing
    ex._scratch = ex._scratch[:0]  # ... which the traced call allocates again
    tracemalloc.start()
    ex.spectrum(task)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    budget = spectrum_memory(task, ctx)
    print(f"peak traced {peak / 2**20:.1f} MiB, budgeted {budget / 2**20:.1f} MiB")
    assert 4 * m * n < peak <= budget < 8 * m * n
    full = RunContext("ab" * 10, str(tmp_path / "store"), Criteria(), "sketch", 32, bare.sketch_rank, subspace_k=16)
    assert spectrum_memory(task, full) == spectrum_memory(task, dataclasses.replace(ctx, rank_mode="exact")) == 16 * m * n
