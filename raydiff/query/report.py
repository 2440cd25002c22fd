"""Reports over runs in a store: the demo's text summary and the HTML/PNG report.

``write_report`` draws four figures with matplotlib — per-layer × module sparsity heatmaps,
sparsity by tolerance, rank ratio per matrix with singular-value decay, and the overlap
matrix against its random baseline — saves each as a PNG and embeds them (base64) in one
self-contained ``report.html``.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from raydiff.errors import QueryError, RunNotFound
from raydiff.query.overlap import pairwise
from raydiff.store import redact
from raydiff.query.views import connect

MODULE_ORDER = ("embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head", "other")


def demo_report(store: str, run_ids: Mapping[str, str], accuracy: Mapping[str, float]) -> str:
    """A short text report of the demo family: sparsity per run, RL-seed overlap, rank ratio.

    Args:
        store: store root.
        run_ids: family member name → run id.
        accuracy: greedy exact-match accuracy per member (and ``base``).
    """
    con = connect(store)
    try:
        lines = [
            "raydiff demo: finetunes of a 2-layer Llama-layout model trained on 2-digit addition",
            f"base greedy accuracy {accuracy.get('base', float('nan')):.1%}",
            "sparsity = 1 - changed/numel, element-weighted over all parameters;",
            "changed = |Δ| > atol (paper's criterion, Δ in bf16); bitwise = stored bits differ;",
            "rank ratio = unweighted mean over 2-D matrices of rank(ΔW)/min(m, n), paper's matrix_rank",
            "",
            f"{'run':<18} {'accuracy':>8} {'atol':>7} {'sparsity':>9} {'bitwise':>9} {'rank ratio':>10}",
        ]
        for name, run_id in run_ids.items():
            row = con.execute(
                "SELECT r.atol, r.sparsity, r.sparsity_bits, avg(t.rank_ratio) FROM runs r "
                "LEFT JOIN tensors t USING (run_id) WHERE r.run_id = ? GROUP BY ALL", [run_id]).fetchone()
            atol, sp, spb, rr = row
            rr_s = f"{rr:10.1%}" if rr is not None else f"{'-':>10}"
            acc = accuracy.get(name)
            acc_s = f"{acc:8.1%}" if acc is not None else f"{'-':>8}"
            lines.append(f"{name:<18} {acc_s} {atol:7.0e} {sp:9.1%} {spb:9.1%} {rr_s}")
        if "rl-seed1" in run_ids and "rl-seed2" in run_ids:
            o = con.execute("SELECT o1, o2, o1_random, o2_random, jaccard, jaccard_random "
                            "FROM overlap_total(?, ?)", [run_ids["rl-seed1"], run_ids["rl-seed2"]]).fetchone()
            lines += ["", "subnetwork overlap of the two RL seeds (rl-seed1 vs rl-seed2), all parameters:",
                      f"  o1 {o[0]:.1%}  o2 {o[1]:.1%}  (random baseline {o[2]:.1%} / {o[3]:.1%});"
                      f"  Jaccard {o[4]:.1%} (random {o[5]:.1%})"]
        shown = redact(store)
        lines += ["", f"store: {shown}   try: raydiff sql \"SELECT * FROM runs\" --store {shown}",
                  f"       raydiff report {' '.join(run_ids)} --store {shown} --out report"]
        return "\n".join(lines)
    finally:
        con.close()


def _resolve(con, runs: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for r in runs:
        try:
            (run_id,) = con.execute("SELECT run_ref(?)", [r]).fetchone()
        except Exception as e:  # duckdb raises the macro's error() as InvalidInputException
            raise RunNotFound(str(e).split("Error: ", 1)[-1]) from None
        (name,) = con.execute("SELECT name FROM runs WHERE run_id = ?", [run_id]).fetchone()
        out.append((run_id, name))
    return out


def write_report(store: str, runs: Sequence[str], out: str | Path) -> Path:
    """Write ``report.html`` and one PNG per figure for complete runs (names or ids).

    Returns:
        Path of the HTML file.

    Raises:
        RunNotFound: a run matches no complete run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    con = connect(store)
    try:
        resolved = _resolve(con, runs)
        figures: list[tuple[str, str, object]] = []
        figures.append(("heatmap", "Sparsity per layer × module (element-weighted, |Δ| > atol)",
                        _heatmaps(con, resolved, plt)))
        figures.append(("tolerance", "Sparsity by criterion (element-weighted)", _tolerance(con, resolved, plt)))
        figures.append(("rank", "Rank ratio per matrix and singular-value decay", _rank(con, resolved, plt)))
        if len(resolved) >= 2:
            figures.append(("overlap", "Subnetwork overlap o1 (row run's changes also changed by column run) "
                                       "vs random baseline", _overlap(con, resolved, plt)))
        summary = con.execute(
            "SELECT r.name, r.run_id, r.status, r.atol, r.sparsity, "
            "(SELECT avg(sparsity) FROM tensors t WHERE t.run_id = r.run_id AND t.status = 'ok'), "
            "(SELECT avg(rank_ratio) FROM tensors t WHERE t.run_id = r.run_id) "
            "FROM runs r WHERE r.run_id IN (SELECT unnest(?))", [[rid for rid, _ in resolved]]).fetchall()
        order = [rid for rid, _ in resolved]
        summary.sort(key=lambda r: order.index(r[1]))
    except QueryError:
        raise
    finally:
        con.close()
    parts = []
    for key, title, fig in figures:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        fig.savefig(out / f"{key}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2>\n<img alt='{key}' src='data:image/png;base64,{data}'>")
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in summary)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>raydiff report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style>
</head><body>
<h1>raydiff report</h1>
<p>Store <code>{html.escape(redact(str(store)))}</code>. Sparsity = 1 − changed/numel;
<b>weighted</b> = over all elements, <b>mean</b> = unweighted mean of per-tensor sparsity.</p>
<table><tr><th>run</th><th>run id</th><th>status</th><th>atol</th><th>sparsity (weighted)</th>
<th>sparsity (mean of tensors)</th><th>mean rank ratio</th></tr>
{rows}
</table>
{chr(10).join(parts)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _short(tensor: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` → ``3.up_proj``."""
    parts = tensor.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    mod = parts[-2] if len(parts) > 1 else parts[0]
    return f"{layer}.{mod}" if layer is not None else mod


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _heatmaps(con, runs, plt):
    import numpy as np

    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs) + 1, 4), squeeze=False)
    for ax, (run_id, name) in zip(axes[0], runs):
        rows = con.execute("SELECT coalesce(CAST(layer AS VARCHAR), '-'), module, sparsity_weighted FROM layers "
                           "WHERE run_id = ? AND module <> '*'", [run_id]).fetchall()
        layer_names = sorted({r[0] for r in rows}, key=lambda x: (x != "-", int(x) if x != "-" else -1))
        mods = [m for m in MODULE_ORDER if any(r[1] == m for r in rows)]
        grid = np.full((len(layer_names), len(mods)), np.nan)
        for layer, mod, sp in rows:
            grid[layer_names.index(layer), mods.index(mod)] = sp
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(mods)), mods, rotation=45)
        ax.set_yticks(range(len(layer_names)), layer_names)
        ax.set_xlabel("module")
        ax.set_ylabel("layer ('-' = outside the layer stack)")
        ax.set_title(name)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="sparsity")
    return fig


def _tolerance(con, runs, plt):
    fig, ax = plt.subplots(figsize=(7, 4))
    for run_id, name in runs:
        rows = con.execute("SELECT criterion, sparsity_weighted FROM sparsity_by_tolerance WHERE run_id = ? "
                           "ORDER BY pos", [run_id]).fetchall()
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=name)
    ax.set_ylabel("sparsity (element-weighted)")
    ax.set_xlabel("criterion")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _rank(con, runs, plt):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for run_id, name in runs:
        rows = con.execute("SELECT tensor_index, rank_ratio FROM tensors WHERE run_id = ? AND rank_ratio IS NOT NULL "
                           "ORDER BY tensor_index", [run_id]).fetchall()
        ax1.plot(range(len(rows)), [r[1] for r in rows], marker=".", linestyle="none", label=name)
    ax1.set_ylim(0, 1.05)
    ax1.set_xlabel("2-D matrix (by name)")
    ax1.set_ylabel("rank(ΔW) / min(m, n)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    run_id, name = runs[0]
    rows = con.execute("SELECT tensor, top_sv FROM tensors WHERE run_id = ? AND top_sv IS NOT NULL "
                       "AND len(top_sv) > 1 ORDER BY numel DESC, tensor LIMIT 8", [run_id]).fetchall()
    for tensor, sv in rows:
        if sv and sv[0]:
            ax2.semilogy(range(1, len(sv) + 1), [s / sv[0] for s in sv], label=_short(tensor))
    ax2.set_xlabel("i")
    ax2.set_ylabel("σ_i / σ_1")
    ax2.set_title(f"singular-value decay ({name}, largest matrices)")
    ax2.grid(alpha=0.3)
    if rows:
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no spectra: the run used --rank off", ha="center", transform=ax2.transAxes)
    return fig


def _overlap(con, runs, plt):
    import numpy as np

    names = [n for _, n in runs]
    ids = [r for r, _ in runs]
    pairs = pairwise(con, ids).to_pylist()
    o = np.eye(len(ids))
    rnd = np.full((len(ids), len(ids)), np.nan)
    for p in pairs:
        i, j = ids.index(p["run_a"]), ids.index(p["run_b"])
        o1, o2, o1r, o2r = p["o1"], p["o2"], p["o1_random"], p["o2_random"]
        o[i, j], o[j, i] = o1, o2
        rnd[i, j], rnd[j, i] = o1r, o2r
    fig, ax = plt.subplots(figsize=(1.4 * len(ids) + 3, 1.2 * len(ids) + 2))
    im = ax.imshow(o, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(ids)), names, rotation=45)
    ax.set_yticks(range(len(ids)), names)
    for i in range(len(ids)):
        for j in range(len(ids)):
            label = f"{o[i, j]:.0%}" if i == j else f"{o[i, j]:.0%}\n(rnd {rnd[i, j]:.0%})"
            ax.text(j, i, label, ha="center", va="center", color="w" if o[i, j] < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="o1 = |I_row ∩ I_col| / |I_row|")
    return fig
