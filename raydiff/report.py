"""Reports over runs in a store: the text summary printed by ``raydiff demo``."""

from __future__ import annotations

from collections.abc import Mapping

from raydiff.views import connect


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
            lines.append(f"{name:<18} {accuracy.get(name, float('nan')):8.1%} {atol:7.0e} {sp:9.1%} {spb:9.1%} {rr_s}")
        if "rl-seed1" in run_ids and "rl-seed2" in run_ids:
            o = con.execute("SELECT o1, o2, o1_random, o2_random, jaccard, jaccard_random "
                            "FROM overlap_total(?, ?)", [run_ids["rl-seed1"], run_ids["rl-seed2"]]).fetchone()
            lines += ["", "subnetwork overlap of the two RL seeds (rl-seed1 vs rl-seed2), all parameters:",
                      f"  o1 {o[0]:.1%}  o2 {o[1]:.1%}  (random baseline {o[2]:.1%} / {o[3]:.1%});"
                      f"  Jaccard {o[4]:.1%} (random {o[5]:.1%})"]
        lines += ["", f"store: {store}   try: raydiff sql \"SELECT * FROM runs\" --store {store}"]
        return "\n".join(lines)
    finally:
        con.close()
