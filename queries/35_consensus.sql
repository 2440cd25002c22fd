-- consensus(run_list): for a list of runs over one base (names or ids), per tensor compared
-- in all of them, how many entries are changed in exactly k of the N runs, k = 0 … N:
-- `histogram[k + 1]` (DuckDB lists start at 1). `in_all` = entries changed in every run.
CREATE OR REPLACE MACRO consensus(run_list) AS TABLE
WITH r AS (
    SELECT x, run_ref(x) AS run_id FROM (SELECT unnest(run_list) AS x)
),
chk AS (
    SELECT CASE WHEN p IS NULL THEN true ELSE error(p) END AS ok, n_runs
    FROM (
        SELECT min(_pair_problem(first_id, r.run_id)) AS p, count(DISTINCT r.run_id) AS n_runs
        FROM r, (SELECT min(run_id) AS first_id FROM r)
    )
),
u AS (
    SELECT u.tensor, u."start", u."stop",
           list(u.mask_codec ORDER BY u.run_id) AS codecs, list(u.mask ORDER BY u.run_id) AS masks
    FROM raw_unit AS u, chk
    WHERE chk.ok AND u.run_id IN (SELECT run_id FROM r)
    GROUP BY u.tensor, u."start", u."stop"
    HAVING count(*) = any_value(chk.n_runs)
),
h AS (
    SELECT tensor, "stop" - "start" AS numel, mask_histogram(codecs, masks, "stop" - "start") AS hist FROM u
),
k AS (
    SELECT tensor, numel, generate_subscripts(hist, 1) AS pos, unnest(hist) AS cnt FROM h
),
t AS (
    SELECT tensor, pos, sum(cnt) AS cnt FROM k GROUP BY tensor, pos
)
SELECT t.tensor,
       sum(t.cnt) AS numel,
       (SELECT n_runs FROM chk) AS n_runs,
       list(t.cnt ORDER BY t.pos) AS histogram,
       arg_max(t.cnt, t.pos) AS in_all
FROM t
GROUP BY t.tensor
ORDER BY t.tensor;
