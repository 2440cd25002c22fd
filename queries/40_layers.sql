-- tensor_modules: tensors of complete runs with their transformer layer index (NULL outside
-- the layer stack) and module kind: q, k, v, o, gate, up, down, norm, embed, lm_head or other.
CREATE OR REPLACE VIEW tensor_modules AS
SELECT
    t.*,
    TRY_CAST(regexp_extract(t.tensor, '\.(?:layers|h|blocks|layer)\.(\d+)\.', 1) AS INTEGER) AS layer,
    CASE
        WHEN regexp_matches(t.tensor, 'norm|\.ln_?\d*\.|layernorm') THEN 'norm'
        WHEN regexp_matches(t.tensor, 'embed|wte|wpe|tok_embeddings') THEN 'embed'
        WHEN regexp_matches(t.tensor, 'lm_head|\.output\.weight$') THEN 'lm_head'
        WHEN regexp_matches(t.tensor, 'q_proj|\.wq\.|query') THEN 'q'
        WHEN regexp_matches(t.tensor, 'k_proj|\.wk\.|key') THEN 'k'
        WHEN regexp_matches(t.tensor, 'v_proj|\.wv\.|value') THEN 'v'
        WHEN regexp_matches(t.tensor, 'o_proj|\.wo\.|out_proj|attn\.dense|c_proj') THEN 'o'
        WHEN regexp_matches(t.tensor, 'gate_proj|\.w1\.') THEN 'gate'
        WHEN regexp_matches(t.tensor, 'up_proj|\.w3\.|fc1|c_fc') THEN 'up'
        WHEN regexp_matches(t.tensor, 'down_proj|\.w2\.|fc2') THEN 'down'
        ELSE 'other'
    END AS module
FROM tensors AS t;

-- layers: per run, per layer and module kind (module = '*' for the whole layer), over the
-- compared tensors. Two weightings, never to be confused:
--   sparsity_weighted = 1 - Σchanged / Σnumel   (element-weighted, the paper's global number)
--   sparsity_mean     = mean of per-tensor sparsity (unweighted, the paper's per-layer code)
CREATE OR REPLACE VIEW layers AS
SELECT
    run_id,
    layer,
    CASE WHEN grouping(module) = 1 THEN '*' ELSE module END AS module,
    count(*) AS n_tensors,
    sum(numel) AS numel,
    sum(changed) AS changed,
    1 - sum(changed) / NULLIF(sum(numel), 0) AS sparsity_weighted,
    avg(sparsity) AS sparsity_mean,
    1 - sum(changed_bits) / NULLIF(sum(numel), 0) AS sparsity_bits_weighted,
    1 - sum(changed_1e8) / NULLIF(sum(numel), 0) AS sparsity_1e8_weighted,
    1 - sum(changed_1e7) / NULLIF(sum(numel), 0) AS sparsity_1e7_weighted,
    1 - sum(changed_1e6) / NULLIF(sum(numel), 0) AS sparsity_1e6_weighted,
    1 - sum(changed_1e5) / NULLIF(sum(numel), 0) AS sparsity_1e5_weighted,
    1 - sum(changed_1e4) / NULLIF(sum(numel), 0) AS sparsity_1e4_weighted,
    1 - sum(changed_rel) / NULLIF(sum(numel), 0) AS sparsity_rel_weighted,
    avg(rank_ratio) AS mean_rank_ratio,
    sqrt(sum(delta_fro * delta_fro)) / NULLIF(sqrt(sum(base_fro * base_fro)), 0) AS rel_delta_fro
FROM tensor_modules
WHERE status = 'ok'
GROUP BY GROUPING SETS ((run_id, layer, module), (run_id, layer))
ORDER BY run_id, layer NULLS FIRST, module;

-- sparsity_by_tolerance: per run and criterion, element-weighted and unweighted sparsity.
-- criterion: 'bits' (stored bits differ), 'atol=1e-08' … 'atol=0.0001' (the ladder),
-- 'rel' (|Δ| > η·max(|w|,|ŵ|)); `threshold` is the tolerance (NULL for bits and rel).
CREATE OR REPLACE VIEW sparsity_by_tolerance AS
WITH c AS (
    SELECT run_id, numel, sparsity_bits, sparsity_1e8, sparsity_1e7, sparsity_1e6, sparsity_1e5,
           sparsity_1e4, sparsity_rel,
           [changed_bits, changed_1e8, changed_1e7, changed_1e6, changed_1e5, changed_1e4, changed_rel] AS counts,
           [sparsity_bits, sparsity_1e8, sparsity_1e7, sparsity_1e6, sparsity_1e5, sparsity_1e4, sparsity_rel] AS sp
    FROM tensors WHERE status = 'ok'
),
k AS (
    SELECT * FROM (VALUES
        (1, 'bits', NULL::DOUBLE), (2, 'atol=1e-08', 1e-8), (3, 'atol=1e-07', 1e-7), (4, 'atol=1e-06', 1e-6),
        (5, 'atol=1e-05', 1e-5), (6, 'atol=0.0001', 1e-4), (7, 'rel', NULL::DOUBLE)
    ) AS v(pos, criterion, threshold)
)
SELECT c.run_id, k.pos, k.criterion, k.threshold,
       sum(c.counts[k.pos]) AS changed,
       sum(c.numel) AS numel,
       1 - sum(c.counts[k.pos]) / NULLIF(sum(c.numel), 0) AS sparsity_weighted,
       avg(c.sp[k.pos]) AS sparsity_mean
FROM c, k
GROUP BY c.run_id, k.pos, k.criterion, k.threshold
ORDER BY c.run_id, k.pos;
