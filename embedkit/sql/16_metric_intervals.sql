-- metric_intervals: the observed value of every metric and gap beside its bootstrap percentile interval.
-- Grain: one row per (run_id, split, attribute, group_or_gap, metric).
-- Columns: run_id, split, attribute, group_or_gap, family, metric, value, n (of the observed sample), ci_low, ci_high
--   (the (1 - getvariable('ci_level')) / 2 and (1 + ci_level) / 2 quantiles, linearly interpolated, of the
--   replicates' values; NULL without replicates), n_replicates (replicates in which the metric is defined).
-- Replicates exist only while embedkit.fairness.bootstrap has filled resample_weights: bootstrap draws are
-- replicates 1.., jackknife (leave one patient out) replicates are negative and serve the BCa interval that
-- embedkit.fairness.bootstrap adds (see there); the percentile interval here reads the draws only.
-- interval_summary(source) is the same table over any relation with metric_values' columns (the bootstrap reads a
-- materialised copy, so the replicates are computed once). One pass over the source (FILTER tells the observed
-- sample from the replicates): reading it twice would compute every replicate twice.
CREATE OR REPLACE MACRO interval_summary(source) AS TABLE
SELECT
    run_id, split, attribute, group_or_gap, family, metric,
    any_value(value) FILTER (WHERE replicate = 0) AS value,
    any_value(n) FILTER (WHERE replicate = 0) AS n,
    quantile_cont(value, (1 - getvariable('ci_level')) / 2) FILTER (WHERE replicate > 0) AS ci_low,
    quantile_cont(value, (1 + getvariable('ci_level')) / 2) FILTER (WHERE replicate > 0) AS ci_high,
    count(value) FILTER (WHERE replicate > 0) AS n_replicates
FROM query_table(source)
GROUP BY run_id, split, attribute, group_or_gap, family, metric
HAVING count(*) FILTER (WHERE replicate = 0) > 0;

CREATE OR REPLACE VIEW metric_intervals AS SELECT * FROM interval_summary('metric_values');
