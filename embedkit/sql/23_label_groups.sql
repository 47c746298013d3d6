-- label_groups: the names behind each group_key of the label-level rows, and the labels of each run.
-- Grain: one row per (group_key, label_index): (run_id, split, attribute, group_name) of the observed sample.
-- Columns: group_key, run_id, split, attribute, group_name, label_index, label_name.
-- Read from the observed sample (replicate 0) only: a replicate's groups are the observed groups (the bootstrap
-- redraws within each group), and the names stay out of the per-row aggregates of label_counts.
CREATE OR REPLACE VIEW label_groups AS
SELECT DISTINCT group_key, run_id, split, attribute, group_name, label_index, label_name
FROM label_group_rows
WHERE replicate = 0;
