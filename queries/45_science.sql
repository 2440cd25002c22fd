-- profile(run, tensor): the row and column profiles of one tensor's change mask (Zhu et al.,
-- arXiv 2511.08567): one row per row (axis 'row') and per column (axis 'col') of a compared
-- ≥ 2-D tensor, with its changed entries, its length n and fraction = changed / n. Read from
-- the run's stored masks, so it works on runs of any release. `tensors.row_cv` and `col_cv`
-- are the coefficients of variation of these fractions.
-- mask_profile(id, tensor) is a Python function of the connection (raydiff.query.overlap).
CREATE OR REPLACE MACRO profile(run_name, tensor_name) AS TABLE
WITH p AS (SELECT unnest(mask_profile(run_ref(run_name), tensor_name), recursive := true))
SELECT axis, "index", changed, n, changed / NULLIF(n, 0) AS fraction
FROM p
ORDER BY axis DESC, "index";

-- jaccard_matrix(run_list): for N ≥ 2 runs over one base (names or ids), the mean over all
-- pairs of runs of the Jaccard index |A∩B| / |A∪B| of their masks (Zhu et al., Table 2),
-- beside the mean of the random baseline pq / (p + q − pq) (p, q: the two densities). One row
-- per tensor compared in every run (layer and module from tensor_modules), one per layer ×
-- module with tensor = '*' (each pair's sets joined over the group's tensors, then the mean),
-- and one total (tensor = '*', layer NULL, module = '*'). A pair where neither run changed
-- anything has no Jaccard index and is left out of the mean (n_pairs counts every pair).
-- mask_pairs(ids) reads each run's masks once (raydiff.query.overlap).
CREATE OR REPLACE MACRO jaccard_matrix(run_list) AS TABLE
WITH r AS (
    SELECT list(run_ref(x)) AS ids FROM (SELECT unnest(run_list) AS x)
),
chk AS (
    SELECT CASE
               WHEN len(list_distinct(ids)) < 2 THEN error('jaccard_matrix needs at least two different runs')
               WHEN p IS NULL THEN true ELSE error(p) END AS ok, ids
    FROM (
        SELECT min(_pair_problem(ids[1], x)) AS p, any_value(ids) AS ids
        FROM r, (SELECT unnest(ids) AS x FROM r)
    )
),
u AS (
    SELECT unnest(mask_pairs(list_distinct(ids)), recursive := true), ids[1] AS first, len(list_distinct(ids)) AS n_runs
    FROM chk WHERE chk.ok
),
m AS (
    SELECT u.*, tm.layer, tm.module
    FROM u LEFT JOIN tensor_modules AS tm ON tm.run_id = u.first AND tm.tensor = u.tensor
),
per_pair AS (
    SELECT tensor, layer, module, false AS is_group, a, b, any_value(n_runs) AS n_runs, sum(numel) AS numel,
           sum(changed_a) AS ca, sum(changed_b) AS cb, sum(changed_both) AS cab
    FROM m GROUP BY tensor, layer, module, a, b
    UNION ALL
    SELECT '*', CASE WHEN grouping(module) = 1 THEN NULL ELSE layer END,
           CASE WHEN grouping(module) = 1 THEN '*' ELSE module END, true, a, b, any_value(n_runs), sum(numel),
           sum(changed_a), sum(changed_b), sum(changed_both)
    FROM m GROUP BY GROUPING SETS ((layer, module, a, b), (a, b))
)
SELECT tensor, layer, module, any_value(n_runs) AS n_runs, count(*) AS n_pairs, any_value(numel) AS numel,
       avg(cab / NULLIF(ca + cb - cab, 0)) AS jaccard_mean,
       min(cab / NULLIF(ca + cb - cab, 0)) AS jaccard_min,
       max(cab / NULLIF(ca + cb - cab, 0)) AS jaccard_max,
       avg((ca / numel) * (cb / numel) / NULLIF(ca / numel + cb / numel - (ca / numel) * (cb / numel), 0))
           AS jaccard_random_mean
FROM per_pair
GROUP BY tensor, layer, module, is_group
ORDER BY is_group, tensor, layer NULLS LAST, module;
