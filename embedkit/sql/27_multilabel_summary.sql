-- multilabel_summary: the observed per-label metrics, underdiagnosis and gaps of every multi-label run: the table to
-- query (the multi-label twin of fairness_summary).
-- Grain: one row per (run_id, split, attribute, group_or_gap, metric).
-- Columns: run_id, split, label_name (NULL for underdiagnosis), attribute, group_or_gap, family, metric, value, n.
-- Example: SELECT attribute, group_or_gap, value, n FROM multilabel_summary
--          WHERE split = 'test' AND family IN ('underdiagnosis', 'underdiagnosis_gap') ORDER BY attribute;
CREATE OR REPLACE VIEW multilabel_summary AS
SELECT run_id, split, label_name, attribute, group_or_gap, family, metric, value, n
FROM label_metric_values
WHERE replicate = 0;
