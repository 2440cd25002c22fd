"""Reports over runs in a store: the demo's text summary and the HTML/PNG report.

``write_report`` draws five figures with matplotlib — per-layer × module sparsity heatmaps,
sparsity by tolerance, rank ratio per matrix with singular-value decay, the follow-up
papers' principal angles and magnitude-mask overlap, and the overlap matrix against its
random baseline — and, when the runs show a chain of checkpoints, the chain's steps; saves
each as a PNG and embeds them (base64) in one self-contained ``report.html``.
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


def demo_report(store: str, run_ids: Mapping[str, str], accuracy: Mapping[str, float],
                chain: str | None = None) -> str:
    """A short text report of the demo family: sparsity per run, RL-seed overlap, rank ratio,
    and the steps of ``chain``.

    Args:
        store: store root.
        run_ids: family member name → run id.
        accuracy: greedy exact-match accuracy per member (and ``base``).
        chain: a chain of checkpoints in the store (the RL run's), or ``None``.
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
        lines += ["", *_science_lines(con, run_ids)]
        if chain is not None:
            lines += ["", *_chain_lines(con, chain)]
        shown = redact(store)
        lines += ["", f"store: {shown}   try: raydiff sql \"SELECT * FROM runs\" --store {shown}",
                  f"       raydiff report {' '.join(run_ids)} --store {shown} --out report"]
        return "\n".join(lines)
    finally:
        con.close()


#: The follow-up papers' numbers per run, averaged over its 2-D matrices (unweighted).
_SCIENCE_SQL = """
SELECT avg(principal_angle_max_deg), max(principal_angle_max_deg), avg(spectral_shift),
       avg(energy_rank_99 / NULLIF(max_rank, 0)), avg(low_mag_overlap_30), avg(low_mag_frac_30),
       avg(row_cv / NULLIF(row_cv_random, 0)), avg(col_cv / NULLIF(col_cv_random, 0))
FROM tensors WHERE run_id = ? AND status = 'ok' AND len(shape) = 2 AND rows IS NOT NULL
"""


def _science_lines(con, run_ids: Mapping[str, str]) -> list[str]:
    """The follow-up metrics per run: principal angles, spectral shift, energy rank,
    magnitude-mask overlap and row/column stripes (docs/science.md)."""
    lines = ["beyond the paper (mean over 2-D matrices; docs/science.md):",
             "angle = largest principal angle of the top-16 singular subspaces of W0 vs W1; shift = top-16 spectral",
             "shift; E99 = energy rank / min(m, n); M_low30 = share of changes on the 30 % smallest |W0| (random: 30 %);",
             "row/col CV× = CV of per-row/column changed fractions over a random mask's",
             f"{'run':<18} {'angle°':>7} {'max°':>7} {'shift':>8} {'E99':>6} {'M_low30':>8} {'row CV×':>8} {'col CV×':>8}"]

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    for name, run_id in run_ids.items():
        a, amax, shift, e99, low, frac, rcv, ccv = con.execute(_SCIENCE_SQL, [run_id]).fetchall()[0]
        lines.append(f"{name:<18} {f(a, '7.2f'):>7} {f(amax, '7.2f'):>7} {f(shift, '8.1e'):>8} {f(e99, '6.1%'):>6} "
                     f"{f(low, '8.1%'):>8} {f(rcv, '8.2f'):>8} {f(ccv, '8.2f'):>8}")
    return lines


def _chain_lines(con, chain: str) -> list[str]:
    """Per step of the chain the step's sparsity, and where the chain ended: never updated,
    cancelled, subnetwork (every change counted: the chain's runs are at atol 0)."""
    rows = con.execute("SELECT step, tuned, numel, changed_vs_base, changed_since_prev, changed_ever, cancelled "
                       "FROM chain_steps(?)", [chain]).fetchall()
    _, _, _, never, cancelled, sub = con.execute(
        "SELECT * FROM chain_summary(?) WHERE module IS NULL", [chain]).fetchone()
    lines = [f"chain {chain}: each checkpoint against the one before (step sparsity = 1 - changed since the previous",
             "checkpoint / numel) and against the base; changed = value differs (atol 0), all parameters",
             f"{'step':>4}  {'checkpoint':<18} {'step sparsity':>13} {'vs base':>9} {'ever changed':>12} "
             f"{'cancelled':>9}"]
    for step, tuned, numel, now, since, ever, canc in rows:
        name = tuned.rstrip("/").rsplit("/", 1)[-1]
        lines.append(f"{step:>4}  {name:<18} {1 - since / numel:13.1%} {1 - now / numel:9.1%} {ever / numel:12.1%} "
                     f"{canc / numel:9.1%}")
    lines.append(f"  at the last step: never updated {never:.1%}, cancelled {cancelled:.1%} (changed, then back to "
                 f"the base value), subnetwork {sub:.1%}")
    return lines


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
        science = _science(con, resolved, plt)
        if science is not None:  # runs with --rank off have no per-matrix metric to draw
            figures.append(("science", "Beyond the paper: largest principal angle per layer × module, and the share "
                                       "of changes on the smallest |W0| against its random baseline", science))
        if len(resolved) >= 2:
            figures.append(("overlap", "Subnetwork overlap o1 (row run's changes also changed by column run) "
                                       "vs random baseline", _overlap(con, resolved, plt)))
        for i, chain in enumerate(_chains_of(con, resolved)):
            figures.append(("chain" if i == 0 else f"chain-{i + 1}",
                            f"Chain {chain}: sparsity of each step and against the base, and where the chain ended "
                            "(every change counted, atol 0)", _chain(con, chain, plt)))
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


def _science(con, runs, plt):
    import numpy as np

    names = [n for _, n in runs]
    rows = con.execute(
        "SELECT run_id, layer, module, max(principal_angle_max_deg) FROM tensor_modules "
        "WHERE run_id IN (SELECT unnest(?)) AND principal_angle_max_deg IS NOT NULL GROUP BY ALL",
        [[r for r, _ in runs]]).fetchall()
    cols = sorted({(lay, mod) for _, lay, mod, _ in rows},
                  key=lambda k: (k[0] if k[0] is not None else -1,
                                 MODULE_ORDER.index(k[1]) if k[1] in MODULE_ORDER else len(MODULE_ORDER)))
    lows = con.execute("SELECT count(low_mag_overlap_30) FROM tensors WHERE run_id IN (SELECT unnest(?))",
                       [[r for r, _ in runs]]).fetchall()[0][0]
    if not rows and not lows:
        return None
    grid = np.full((len(runs), max(1, len(cols))), np.nan)
    for run_id, lay, mod, deg in rows:
        grid[[r for r, _ in runs].index(run_id), cols.index((lay, mod))] = deg
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(8.0, 0.45 * len(cols) + 6), 1.0 + 0.5 * len(runs) + 2),
                                 gridspec_kw={"width_ratios": [max(1, len(cols)), 6]})
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(runs)), names)
    ax.set_xticks(range(len(cols)), [f"{'-' if lay is None else lay}.{mod}" for lay, mod in cols], rotation=90,
                  fontsize=7)
    fig.colorbar(im, ax=ax, label="largest principal angle (°)")
    alphas = (10, 30, 50)
    width = 0.8 / len(alphas)
    for k, pct in enumerate(alphas):
        vals = [con.execute(f"SELECT avg(low_mag_overlap_{pct}), avg(low_mag_frac_{pct}) FROM tensors "
                            "WHERE run_id = ? AND status = 'ok'", [r]).fetchall()[0] for r, _ in runs]
        x = np.arange(len(runs)) + (k - 1) * width
        bx.barh(x, [v[0] if v[0] is not None else np.nan for v in vals], height=width, label=f"α = {pct / 100:.1f}")
        bx.scatter([v[1] if v[1] is not None else np.nan for v in vals], x, marker="|", color="k", s=80,
                   label="random baseline" if k == 0 else None)
    bx.set_yticks(range(len(runs)), names)
    bx.invert_yaxis()  # runs top to bottom, as in the heatmap beside it
    bx.set_xlabel("|M_low(α) ∩ M| / |M|")
    bx.legend(fontsize=7)
    return fig


def _chains_of(con, runs) -> list[str]:
    """The chains the report's runs show: one of the chain's runs is among them, or each of
    its checkpoints is the tuned side of one of them over the chain's base."""
    ids = [r for r, _ in runs]
    given = con.execute("SELECT base, base_revision, tuned, tuned_revision FROM runs WHERE run_id IN (SELECT unnest(?))",
                        [ids]).fetchall()
    sides = set(given)
    chains: dict[str, list[tuple]] = {}
    for chain, *step in con.execute("SELECT chain, base, base_revision, tuned, tuned_revision, run_vs_base, "
                                    "run_vs_prev FROM chains ORDER BY chain, step").fetchall():
        chains.setdefault(chain, []).append(step)
    return [chain for chain, steps in chains.items()
            if any(s[4] in ids or s[5] in ids for s in steps) or all(tuple(s[:4]) in sides for s in steps)]


def _chain(con, chain: str, plt):
    rows = con.execute("SELECT step, tuned, numel, changed_vs_base, changed_since_prev, changed_ever "
                       "FROM chain_steps(?)", [chain]).fetchall()
    parts = con.execute("SELECT layer, module, never_updated, cancelled, subnetwork FROM chain_summary(?)",
                        [chain]).fetchall()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(4.0, 0.25 * len(parts) + 1.5)))
    steps = [r[0] for r in rows]
    for label, values in (("step sparsity (vs previous checkpoint)", [1 - r[4] / r[2] for r in rows]),
                          ("sparsity vs base", [1 - r[3] / r[2] for r in rows]),
                          ("never updated so far", [1 - r[5] / r[2] for r in rows])):
        ax1.plot(steps, values, marker="o", label=label)
    ax1.set_xticks(steps, [r[1].rstrip("/").rsplit("/", 1)[-1] for r in rows], rotation=30)
    ax1.set_ylim(0, 1.02)
    ax1.set_ylabel("fraction of parameters")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    labels = ["all" if mod is None else f"{'-' if lay is None else lay}.{mod}" for lay, mod, *_ in parts]
    left = [0.0] * len(parts)
    for k, (label, color) in enumerate((("never updated", "#bbbbbb"), ("cancelled", "#f28e2b"),
                                        ("subnetwork at the last step", "#4e79a7"))):
        widths = [p[2 + k] or 0.0 for p in parts]
        ax2.barh(range(len(parts)), widths, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, widths)]
    ax2.set_yticks(range(len(parts)), labels, fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("fraction of the group's parameters")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
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
