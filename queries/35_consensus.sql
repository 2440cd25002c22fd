-- consensus(run_list): for a list of runs over one base (names or ids), per tensor compared
-- in all of them, how many entries are changed in exactly k of the N runs, k = 0 … N:
-- `histogram[k + 1]` (DuckDB lists start at 1). `in_all` = entries changed in every run.
-- mask_consensus(ids) reads the masks of exactly those runs (raydiff.query.overlap).
CREATE OR REPLACE MACRO consensus(run_list) AS TABLE
WITH r AS (
    SELECT list(run_ref(x)) AS ids FROM (SELECT unnest(run_list) AS x)
),
chk AS (
    SELECT CASE WHEN p IS NULL THEN true ELSE error(p) END AS ok, ids
    FROM (
        SELECT min(_pair_problem(ids[1], x)) AS p, any_value(ids) AS ids
        FROM r, (SELECT unnest(ids) AS x FROM r)
    )
),
h AS (
    SELECT unnest(mask_consensus(list_distinct(ids)), recursive := true), len(list_distinct(ids)) AS n_runs
    FROM chk WHERE chk.ok
)
SELECT tensor, numel, n_runs, histogram, histogram[len(histogram)] AS in_all
FROM h
ORDER BY tensor;
