-- tensors: one row per tensor name of either side, for complete runs.
-- Every sparsity is 1 - changed / numel under one criterion (NULL for mismatched tensors).
-- A line ending in `-- {ladder}` stands for one line per step of the tolerance ladder
-- (raydiff.options.ATOL_LADDER): {name} is the step's column suffix (1e8), {t} its value.
CREATE OR REPLACE VIEW tensors AS
WITH t AS (
    SELECT t.*,
        t.changed_ladder[list_position(r.ladder, {t})] AS changed_{name},  -- {ladder}
    FROM raw_tensor AS t
    JOIN raw_commit AS c ON c.run_id = t.run_id
    JOIN raw_run AS r ON r.run_id = t.run_id
)
SELECT
    t.run_id,
    t.tensor,
    t.status,
    t.match,
    t.note,
    t.dtype,
    t.compare_dtype,
    t.shape,
    t.base_shape,
    t.tuned_shape,
    t.numel,
    t.changed,
    t.changed_bits,
    1 - t.changed / NULLIF(t.numel, 0) AS sparsity,
    1 - t.changed_bits / NULLIF(t.numel, 0) AS sparsity_bits,
    1 - t.changed_{name} / NULLIF(t.numel, 0) AS sparsity_{name},  -- {ladder}
    1 - t.changed_rel / NULLIF(t.numel, 0) AS sparsity_rel,
    t.changed_{name},  -- {ladder}
    t.changed_rel,
    t.changed_subprecision,
    t.changed_code,
    t.changed_scale_blocks,
    t.nonfinite,
    t.max_abs_delta,
    t.mean_abs_delta,
    t.delta_fro,
    t.base_fro,
    t.delta_fro / NULLIF(t.base_fro, 0) AS rel_delta_fro,
    t.rows,
    t.rows_touched,
    t.cols,
    t.cols_touched,
    t.rank,
    t.max_rank,
    t.rank / NULLIF(t.max_rank, 0) AS rank_ratio,
    t.rank_method,
    t.stable_rank,
    t.effective_rank,
    t.rank_1e1,
    t.rank_1e2,
    t.rank_1e3,
    t.top_sv,
    t.base_sha256,
    t.tuned_sha256,
    t.energy_rank_99,
    t.subspace_k,
    t.principal_cos_u,
    t.principal_cos_v,
    t.principal_angle_max_deg,
    t.spectral_shift,
    t.spectral_shift_full,
    t.row_cv,
    t.col_cv,
    t.row_cv_random,
    t.col_cv_random,
    t.low_mag_overlap_10,
    t.low_mag_overlap_30,
    t.low_mag_overlap_50,
    t.low_mag_frac_10,
    t.low_mag_frac_30,
    t.low_mag_frac_50,
    t.tensor_index
FROM t;
