-- units: per work unit results (complete and in-progress runs), without the mask bytes.
CREATE OR REPLACE VIEW units AS
SELECT * EXCLUDE (mask, cols_bitmap) FROM raw_unit;

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
