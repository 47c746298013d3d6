-- metric_intervals: the observed value of every metric and gap beside its bootstrap percentile interval.
-- Grain: one row per (run_id, split, attribute, group_or_gap, metric).
-- Columns: run_id, split, attribute, group_or_gap, family, metric, value, n, ci_low, ci_high (the
--   (1 - getvariable('ci_level')) / 2 and (1 + ci_level) / 2 quantiles, linearly interpolated, of the replicates'
--   values; NULL without replicates), n_replicates (replicates where the metric is defined).
-- Replicates exist only after embedkit.fairness.bootstrap has filled resample_weights.
CREATE OR REPLACE VIEW metric_intervals AS
WITH replicates AS (
    SELECT
        run_id, split, attribute, group_or_gap, metric,
        quantile_cont(value, (1 - getvariable('ci_level')) / 2) AS ci_low,
        quantile_cont(value, (1 + getvariable('ci_level')) / 2) AS ci_high,
        count(value) AS n_replicates
    FROM metric_values
    WHERE replicate > 0
    GROUP BY ALL
)
SELECT
    o.run_id, o.split, o.attribute, o.group_or_gap, o.family, o.metric, o.value, o.n,
    r.ci_low, r.ci_high, coalesce(r.n_replicates, 0) AS n_replicates
FROM metric_values AS o
LEFT JOIN replicates AS r USING (run_id, split, attribute, group_or_gap, metric)
WHERE o.replicate = 0;
