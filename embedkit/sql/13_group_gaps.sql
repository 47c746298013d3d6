-- group_gaps: the gaps between the groups of each attribute (definitions: metric_values).
-- Grain: one row per (replicate, run_id, split, attribute, metric).
-- Columns: replicate, run_id, split, attribute, family, metric, value, n (the smallest compared group's size).
CREATE OR REPLACE VIEW group_gaps AS
SELECT replicate, run_id, split, attribute, family, metric, value, n
FROM metric_values
WHERE group_or_gap = 'gap';
