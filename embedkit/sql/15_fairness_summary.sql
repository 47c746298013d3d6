-- fairness_summary: the observed metrics and gaps of every run: the table to query.
-- Grain: one row per (run_id, split, attribute, group_or_gap, metric).
-- Columns: run_id, split, attribute, group_or_gap (a group, 'gap', or a paper gap's direction), metric, value, n.
-- Example: SELECT attribute, group_or_gap, metric, value, n FROM fairness_summary
--          WHERE split = 'test' AND metric IN ('f1_gap', 'eqodds', 'ece_gap');
CREATE OR REPLACE VIEW fairness_summary AS
SELECT run_id, split, attribute, group_or_gap, metric, value, n
FROM metric_values
WHERE replicate = 0;
