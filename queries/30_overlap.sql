-- run_ref(x): the run id of a complete run given by id or by name (a name means the most
-- recently completed run of that name); an error when nothing matches. A Python function of
-- the connection (raydiff.query.views), which DuckDB folds into a constant: a filter such as
-- `WHERE run_id = run_ref('name')` reads only that run's files.

-- _pair_problem(a, b): why two runs' masks do not line up element for element (different
-- bases or different chunk layouts), or NULL when they do: a Python function of the
-- connection over the catalog. It returns text rather than raising, because DuckDB may
-- evaluate a CASE over rows that a WHERE later discards.

-- _pair_check(a, b): true, or an error saying why the two runs cannot be compared.
CREATE OR REPLACE MACRO _pair_check(a, b) AS (
    SELECT CASE WHEN p IS NULL THEN true ELSE error(p) END FROM (SELECT _pair_problem(a, b) AS p)
);

-- _overlap_rows(run_a, run_b): the rows of `overlap` plus the total over all parameters
-- compared in both runs (is_total; tensor '*'); the ratios are written once, here.
-- o1 = |I_a ∩ I_b| / |I_a|, o2 = |I_a ∩ I_b| / |I_b|; the random baselines are those of
-- independent masks with the same densities: o1_random = density of b, o2_random = density of a.
CREATE OR REPLACE MACRO _overlap_rows(run_a, run_b) AS TABLE
WITH ids AS (SELECT run_ref(run_a) AS a, run_ref(run_b) AS b),
ok AS (SELECT a, b, _pair_check(a, b) AS ok FROM ids),
-- mask_overlap(a, b): per tensor compared in both runs, from their masks (raydiff.query.overlap)
u AS (SELECT unnest(mask_overlap(a, b), recursive := true) FROM ok WHERE ok.ok),
t AS (
    SELECT grouping(tensor) = 1 AS is_total, CASE WHEN grouping(tensor) = 1 THEN '*' ELSE tensor END AS tensor,
           sum(numel) AS numel, sum(changed_a) AS changed_a, sum(changed_b) AS changed_b,
           sum(changed_both) AS changed_both
    FROM u GROUP BY GROUPING SETS ((tensor), ())
)
SELECT is_total, tensor, numel, changed_a, changed_b, changed_both,
       changed_both / NULLIF(changed_a, 0) AS o1,
       changed_both / NULLIF(changed_b, 0) AS o2,
       changed_both / NULLIF(changed_a + changed_b - changed_both, 0) AS jaccard,
       changed_b / NULLIF(numel, 0) AS o1_random,
       changed_a / NULLIF(numel, 0) AS o2_random,
       (changed_a / numel) * (changed_b / numel)
           / NULLIF(changed_a / numel + changed_b / numel - (changed_a / numel) * (changed_b / numel), 0)
           AS jaccard_random
FROM t;

-- overlap(run_a, run_b): per tensor compared in both runs, the paper's subnetwork overlap
-- between two runs over one base, with Jaccard and the random baselines.
CREATE OR REPLACE MACRO overlap(run_a, run_b) AS TABLE
SELECT * EXCLUDE (is_total) FROM _overlap_rows(run_a, run_b) WHERE NOT is_total ORDER BY tensor;

-- overlap_total(run_a, run_b): the same over all parameters compared in both runs (one row,
-- tensor = '*').
CREATE OR REPLACE MACRO overlap_total(run_a, run_b) AS TABLE
SELECT * EXCLUDE (is_total) FROM _overlap_rows(run_a, run_b) WHERE is_total;
