-- runs: one row per run in the store, complete or not.
-- status is 'complete' exactly when the run's commit record exists.
CREATE OR REPLACE VIEW runs AS
SELECT
    r.run_id,
    r.name,
    r.base,
    r.base_revision,
    r.tuned,
    r.tuned_revision,
    CASE WHEN c.run_id IS NULL THEN 'incomplete' ELSE 'complete' END AS status,
    c.numel,
    c.changed,
    c.changed_bits,
    1 - c.changed / NULLIF(c.numel, 0) AS sparsity,
    1 - c.changed_bits / NULLIF(c.numel, 0) AS sparsity_bits,
    r.atol,
    r.rel_eta,
    r.ladder,
    r.rank_mode,
    r.chunk_elems,
    r.n_tensors,
    c.n_mismatched,
    r.n_units,
    r.n_spectra,
    c.n_spectra_skipped,
    r.input_bytes,
    r.created_at,
    c.completed_at,
    r.raydiff_version
FROM raw_run AS r
LEFT JOIN raw_commit AS c ON c.run_id = r.run_id;
