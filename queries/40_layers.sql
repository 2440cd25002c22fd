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
    1 - sum(changed_{name}) / NULLIF(sum(numel), 0) AS sparsity_{name}_weighted,  -- {ladder}
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
WITH ok AS (SELECT * FROM tensors WHERE status = 'ok'),
c AS (
    SELECT run_id, numel, 1 AS pos, 'bits' AS criterion, NULL::DOUBLE AS threshold, changed_bits AS changed,
           sparsity_bits AS sparsity FROM ok
    UNION ALL SELECT run_id, numel, 1 + {i}, 'atol={label}', {t}, changed_{name}, sparsity_{name} FROM ok  -- {ladder}
    UNION ALL SELECT run_id, numel, 2 + {steps}, 'rel', NULL, changed_rel, sparsity_rel FROM ok
)
SELECT run_id, pos, criterion, threshold,
       sum(changed) AS changed,
       sum(numel) AS numel,
       1 - sum(changed) / NULLIF(sum(numel), 0) AS sparsity_weighted,
       avg(sparsity) AS sparsity_mean
FROM c
GROUP BY run_id, pos, criterion, threshold
ORDER BY run_id, pos;
