-- tensor_modules: tensors of complete runs with their transformer layer index (NULL outside
-- the layer stack), their expert (NULL outside a mixture of experts' per-expert tensors; a
-- stack of experts spans them all, see `experts`) and module kind: q, k, v, o, qkv (fused),
-- gate, up, down, gate_up (fused), norm, embed, lm_head, router, expert_gate, expert_up,
-- expert_down, expert_gate_up, shared_gate, shared_up, shared_down, shared_gate_up,
-- shared_router or other.
CREATE OR REPLACE VIEW tensor_modules AS
SELECT
    t.*,
    TRY_CAST(regexp_extract(t.tensor, '(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.', 1) AS INTEGER) AS layer,
    TRY_CAST(regexp_extract(t.tensor, '\.experts\.(\d+)\.', 1) AS INTEGER) AS expert,
    CASE
        WHEN regexp_matches(t.tensor, 'norm|(?:^|\.)ln(?:_\w+)?\.', 'i') THEN 'norm'
        WHEN regexp_matches(t.tensor, 'lm_head|embed_out|(?:^|\.)output\.weight$') THEN 'lm_head'
        WHEN regexp_matches(t.tensor, 'embed|wte|wpe|tok_embeddings') THEN 'embed'
        WHEN regexp_matches(t.tensor, 'shared_experts?_gate\.') THEN 'shared_router'
        WHEN regexp_matches(t.tensor, '\.(?:mlp|block_sparse_moe|moe|feed_forward)\.(?:gate|router)\.|\.router\.') THEN 'router'
        WHEN regexp_matches(t.tensor, '(?:shared_experts?|experts)\.(?:\d+\.)?') THEN
            CASE WHEN regexp_matches(t.tensor, 'shared_experts?\.') THEN 'shared_' ELSE 'expert_' END ||
            CASE
                WHEN regexp_matches(t.tensor, 'gate_up_proj') THEN 'gate_up'
                WHEN regexp_matches(t.tensor, 'gate_proj|\.w1\.') THEN 'gate'
                WHEN regexp_matches(t.tensor, 'up_proj|\.w3\.') THEN 'up'
                WHEN regexp_matches(t.tensor, 'down_proj|\.w2\.') THEN 'down'
                ELSE 'other'
            END
        WHEN regexp_matches(t.tensor, 'qkv_proj|query_key_value|c_attn|Wqkv') THEN 'qkv'
        WHEN regexp_matches(t.tensor, 'q_proj|q_a_proj|q_b_proj|\.wq\.|query') THEN 'q'
        WHEN regexp_matches(t.tensor, 'k_proj|\.wk\.|key') THEN 'k'
        WHEN regexp_matches(t.tensor, 'v_proj|\.wv\.|value') THEN 'v'
        WHEN regexp_matches(t.tensor, 'o_proj|attention\.wo\.|out_proj|attn\.dense|attention\.dense|attn\.c_proj') THEN 'o'
        WHEN regexp_matches(t.tensor, 'gate_up_proj') THEN 'gate_up'
        WHEN regexp_matches(t.tensor, 'gate_proj|\.w1\.|\.wi_0\.') THEN 'gate'
        WHEN regexp_matches(t.tensor, 'up_proj|\.w3\.|fc1|c_fc|fc_in|dense_h_to_4h|\.wi(?:_1)?\.') THEN 'up'
        WHEN regexp_matches(t.tensor, 'down_proj|\.w2\.|fc2|fc_out|dense_4h_to_h|mlp\.c_proj|DenseReluDense\.wo\.') THEN 'down'
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

-- experts: per run, layer and expert of a mixture of experts, and per expert module kind
-- (module = '*' for all of the expert's matrices): element-weighted sparsity and the rank
-- of ΔW per matrix. Experts stored one tensor each (mlp.experts.{e}.gate_proj.weight) and
-- stacks of experts (mlp.experts.gate_up_proj, experts × rows × cols: counts from the
-- units, which never straddle two experts; one spectrum per expert) both appear.
CREATE OR REPLACE VIEW experts AS
WITH stacked AS (
    SELECT u.run_id, u.tensor_index, u."start" // (p.numel // p.experts) AS expert,
           sum(u.numel) AS numel, sum(u.changed) AS changed
    FROM units AS u
    JOIN plan AS p ON p.run_id = u.run_id AND p.tensor_index = u.tensor_index
    WHERE p.experts > 0
    GROUP BY ALL
),
matrices AS (
    SELECT run_id, tensor, layer, expert, module, numel, changed, rank, max_rank
    FROM tensor_modules
    WHERE status = 'ok' AND expert IS NOT NULL
    UNION ALL
    SELECT m.run_id, m.tensor, m.layer, x.expert, m.module, x.numel, x.changed, s.rank, s.max_rank
    FROM stacked AS x
    JOIN tensor_modules AS m ON m.run_id = x.run_id AND m.tensor_index = x.tensor_index
    LEFT JOIN spectra AS s ON s.run_id = x.run_id AND s.tensor_index = x.tensor_index AND s.expert = x.expert
)
SELECT
    run_id,
    layer,
    expert,
    CASE WHEN grouping(module) = 1 THEN '*' ELSE module END AS module,
    count(*) AS n_matrices,
    sum(numel) AS numel,
    sum(changed) AS changed,
    1 - sum(changed) / NULLIF(sum(numel), 0) AS sparsity,
    avg(rank / NULLIF(max_rank, 0)) AS mean_rank_ratio,
    min(rank / NULLIF(max_rank, 0)) AS min_rank_ratio
FROM matrices
GROUP BY GROUPING SETS ((run_id, layer, expert, module), (run_id, layer, expert))
ORDER BY run_id, layer NULLS FIRST, expert, module;
