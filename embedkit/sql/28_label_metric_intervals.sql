-- label_metric_intervals: the observed value of every multi-label metric and gap beside its bootstrap percentile
-- interval (metric_intervals over label_metric_values; embedkit.fairness.bootstrap adds the BCa interval).
-- Grain: one row per (run_id, split, attribute, group_or_gap, metric).
-- Columns: those of metric_intervals (run_id, split, attribute, group_or_gap, family, metric, value, n, ci_low,
--   ci_high, n_replicates).
CREATE OR REPLACE VIEW label_metric_intervals AS SELECT * FROM interval_summary('label_metric_values');
