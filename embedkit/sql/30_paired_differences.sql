-- paired_differences / paired_summary: two runs scored on the same split, compared metric by metric on the same
-- bootstrap draws. The draws (resample_weights) are keyed by split and row, not run, so replicate r of run A and
-- replicate r of run B resample the same patients: their difference is one draw of the paired bootstrap.
-- paired_differences(source, run_a, run_b): grain one row per (replicate, split, attribute, group_or_gap, metric)
--   that both runs have; columns replicate, split, attribute, group_or_gap, family, metric, value_a, value_b,
--   difference (value_b - value_a: what B changes relative to A), n (the smaller of the two runs' n).
-- paired_summary(source, run_a, run_b): grain one row per (split, attribute, group_or_gap, metric); columns split,
--   attribute, group_or_gap, family, metric, value_a, value_b, difference, n (observed sample, replicate 0),
--   ci_low, ci_high (percentile interval of the replicates' differences at getvariable('ci_level')),
--   n_replicates (replicates in which both values are defined), p_value (two-sided bootstrap p: twice the smaller
--   share of replicates on either side of 0, at most 1).
-- source: any relation with metric_values' columns (embedkit.fairness.compare reads a materialised copy, so each
-- replicate is computed once for every pair).
CREATE OR REPLACE MACRO paired_differences(source, run_a, run_b) AS TABLE
SELECT
    a.replicate, a.split, a.attribute, a.group_or_gap, a.family, a.metric,
    a.value AS value_a, b.value AS value_b, b.value - a.value AS difference, least(a.n, b.n) AS n
FROM query_table(source) AS a
JOIN query_table(source) AS b
    ON a.replicate = b.replicate AND a.split = b.split AND a.attribute = b.attribute
    AND a.group_or_gap = b.group_or_gap AND a.metric = b.metric
WHERE a.run_id = run_a AND b.run_id = run_b;

CREATE OR REPLACE MACRO paired_summary(source, run_a, run_b) AS TABLE
SELECT
    split, attribute, group_or_gap, family, metric,
    any_value(value_a) FILTER (WHERE replicate = 0) AS value_a,
    any_value(value_b) FILTER (WHERE replicate = 0) AS value_b,
    any_value(difference) FILTER (WHERE replicate = 0) AS difference,
    any_value(n) FILTER (WHERE replicate = 0) AS n,
    quantile_cont(difference, (1 - getvariable('ci_level')) / 2) FILTER (WHERE replicate > 0) AS ci_low,
    quantile_cont(difference, (1 + getvariable('ci_level')) / 2) FILTER (WHERE replicate > 0) AS ci_high,
    count(difference) FILTER (WHERE replicate > 0) AS n_replicates,
    least(1.0, 2 * least(
        avg(CAST(difference <= 0 AS DOUBLE)) FILTER (WHERE replicate > 0),
        avg(CAST(difference >= 0 AS DOUBLE)) FILTER (WHERE replicate > 0))) AS p_value
FROM paired_differences(source, run_a, run_b)
GROUP BY split, attribute, group_or_gap, family, metric
HAVING count(*) FILTER (WHERE replicate = 0) > 0;
