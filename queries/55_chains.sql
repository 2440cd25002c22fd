-- chains: the steps of every chain of checkpoints (`raydiff submit BASE C1 … CT --chain NAME`,
-- or a watched branch with `chain = true`), one row per chain and step t = 1 … n_steps: the
-- checkpoint Cₜ and the step's two complete runs, Cₜ against the base (run_vs_base) and
-- against Cₜ₋₁ (run_vs_prev; step 1: the run against the base). Every run of a chain is at
-- atol = 0, so its mask is "the value changed". A step recorded again with other runs (its
-- checkpoint rewritten) counts with the runs recorded last.
CREATE OR REPLACE VIEW chains AS
WITH latest AS (
    SELECT * FROM raw_chain_step
    QUALIFY row_number() OVER (PARTITION BY chain, step ORDER BY recorded_at DESC, "key" DESC) = 1
)
SELECT chain, step, count(*) OVER (PARTITION BY chain) AS n_steps, base, base_revision, tuned, tuned_revision,
       run_vs_base, run_vs_prev, recorded_at
FROM latest
ORDER BY chain, step;

-- _chain_rows(chain_name): per step and tensor compared in all the chain's runs, the counts of
-- mask_chain(vs_base ids, vs_prev ids), a Python function of the connection
-- (raydiff.query.overlap.chain_units) that reads each run's masks once:
--   changed_vs_base    = |mask(base → Cₜ)|
--   changed_since_prev = |mask(Cₜ₋₁ → Cₜ)|
--   changed_ever       = |mask(C₀ → C₁) ∪ … ∪ mask(Cₜ₋₁ → Cₜ)|
--   cancelled          = |(that union) ∖ mask(base → Cₜ)|: changed on the way, equal to the base at t
-- with the tensor's layer and module (tensor_modules of the run of step 1 against the base).
CREATE OR REPLACE MACRO _chain_rows(chain_name) AS TABLE
WITH c AS (SELECT * FROM chains WHERE chain = chain_name),
ids AS (
    SELECT CASE WHEN count(*) = 0 THEN error('no chain named ''' || chain_name || '''; the chains view lists them')
                ELSE true END AS ok,
           list(run_vs_base ORDER BY step) AS vb, list(run_vs_prev ORDER BY step) AS vp
    FROM c
),
u AS (SELECT unnest(mask_chain(vb, vp), recursive := true), vb[1] AS first, len(vb) AS n_steps FROM ids WHERE ok)
SELECT u.*, tm.layer, tm.module
FROM u LEFT JOIN tensor_modules AS tm ON tm.run_id = u.first AND tm.tensor = u.tensor;

-- chain_steps(chain_name): one row per step t = 1 … T of a chain, over the parameters compared
-- in all its runs: Cₜ (`tuned`, with @revision for a Hub commit), numel, changed_vs_base,
-- changed_since_prev (the step's sparsity is 1 − changed_since_prev / numel), changed_ever
-- and cancelled (see _chain_rows), and the step's two runs.
CREATE OR REPLACE MACRO chain_steps(chain_name) AS TABLE
SELECT r.step, c.tuned || coalesce('@' || c.tuned_revision, '') AS tuned, sum(r.numel)::BIGINT AS numel,
       sum(r.changed_vs_base)::BIGINT AS changed_vs_base, sum(r.changed_since_prev)::BIGINT AS changed_since_prev,
       sum(r.changed_ever)::BIGINT AS changed_ever, sum(r.cancelled)::BIGINT AS cancelled, c.run_vs_base, c.run_vs_prev
FROM _chain_rows(chain_name) AS r
JOIN chains AS c ON c.chain = chain_name AND c.step = r.step
GROUP BY ALL
ORDER BY r.step;

-- chain_summary(chain_name): where the chain ended up at its last step T, as fractions of the
-- parameters compared in all its runs: never_updated (unchanged in every step), cancelled
-- (changed on the way, equal to the base at T) and subnetwork (differing from the base at T,
-- changed_vs_base / numel); the three sum to 1. One row overall (layer and module NULL), then
-- one per layer × module (layer NULL outside the layer stack).
CREATE OR REPLACE MACRO chain_summary(chain_name) AS TABLE
WITH g AS (
    SELECT grouping(module) = 1 AS is_total, layer, module, sum(numel)::BIGINT AS numel,
           sum(changed_ever) AS ever, sum(cancelled) AS cancelled, sum(changed_vs_base) AS now
    FROM _chain_rows(chain_name)
    WHERE step = n_steps
    GROUP BY GROUPING SETS ((layer, module), ())
)
SELECT CASE WHEN is_total THEN NULL ELSE layer END AS layer, CASE WHEN is_total THEN NULL ELSE module END AS module,
       numel, 1 - ever / NULLIF(numel, 0) AS never_updated, cancelled / NULLIF(numel, 0) AS cancelled,
       now / NULLIF(numel, 0) AS subnetwork
FROM g
ORDER BY is_total DESC, layer NULLS FIRST, module;
