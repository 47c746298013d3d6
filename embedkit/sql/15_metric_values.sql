-- metric_values: every metric and every gap, of the observed sample and of each bootstrap replicate.
-- Grain: one row per (replicate, run_id, split, attribute, group_or_gap, metric).
-- Columns: replicate, run_id, split, attribute, group_or_gap (a group's name for a group's value; 'gap' for a
--   max - min gap; a direction such as 'old-young' for a signed paper gap), family, metric, value, n.
CREATE OR REPLACE VIEW metric_values AS
SELECT replicate, run_id, split, attribute, group_name AS group_or_gap, family, metric, value, n FROM group_metrics
UNION ALL
SELECT replicate, run_id, split, attribute, 'gap', family, metric, value, n FROM group_gaps
UNION ALL
SELECT replicate, run_id, split, attribute, direction, family, metric, value, n FROM paper_gaps;
