-- units: per work unit results of complete runs, without the mask bytes and the per-column
-- counts (the `profile` macro gives a tensor's rows and columns).
CREATE OR REPLACE VIEW units AS
SELECT * EXCLUDE (mask, cols_bitmap, col_changed) FROM raw_unit;

-- masks: the compressed `changed` mask of every unit (see README: mask format).
CREATE OR REPLACE VIEW masks AS
SELECT run_id, unit_id, tensor_index, tensor, "start", "stop", numel, changed, mask_codec, mask
FROM raw_unit;

-- spectra: rank and singular values of ΔW per 2-D tensor.
CREATE OR REPLACE VIEW spectra AS
SELECT * FROM raw_spectrum;

-- plan: what each run was asked to do, tensor by tensor (also for incomplete runs).
CREATE OR REPLACE VIEW plan AS
SELECT * FROM raw_plan;

-- progress: how far each incomplete run got (units and spectra written so far).
CREATE OR REPLACE VIEW progress AS
SELECT r.run_id, r.name, p.units_done, r.n_units, p.spectra_done, r.n_spectra,
       (p.units_done + p.spectra_done) / NULLIF(r.n_units + r.n_spectra, 0) AS fraction
FROM raw_progress AS p
JOIN raw_run AS r ON r.run_id = p.run_id;
