-- label_metric_values: every per-label metric of every group, underdiagnosis, and the gaps between groups, for the
-- observed sample (replicate 0) and each bootstrap replicate: the multi-label twin of metric_values (same columns
-- plus label_name, so interval_summary and embedkit.fairness.bootstrap read either).
-- Grain: one row per (replicate, run_id, split, attribute, group_or_gap, metric).
-- Columns: replicate, run_id, split, attribute, group_or_gap (a group; 'gap'; 'worst'; or for a signed difference
--   its direction 'a-b'), family, metric (family[label] for a per-label family, the family itself for
--   underdiagnosis), value, n (the group's weighted rows; for underdiagnosis its diseased rows; for a gap the
--   smallest compared group's), label_name (NULL for underdiagnosis).
-- Per label and group (label_metrics): positives (a count), auc, tpr, fpr, fnr, precision, f1, ece.
-- Per group (underdiagnosis): underdiagnosis.
-- Gaps over the groups of an attribute with a defined value (at least two; 'all' has none), positives excepted:
--   <family>_gap[label] = max - min; <family>_worst[label] = the worst group's value (the lowest auc, tpr,
--   precision, f1; the highest fpr, fnr, ece, underdiagnosis); for an attribute with exactly two groups a < b (by
--   name), <family>_diff[label] = value(a) - value(b), group_or_gap 'a-b' (e.g. 'F-M'): the direction a max - min
--   gap hides, whose bootstrap interval may contain 0 (a max - min gap's never goes below it).
CREATE OR REPLACE VIEW label_metric_values AS
WITH groups AS MATERIALIZED (
    SELECT replicate, run_id, split, attribute, group_name, label_name, family,
           family || '[' || label_name || ']' AS metric, value, n
    FROM (
        SELECT replicate, run_id, split, attribute, group_name, label_name, n,
               positives::DOUBLE AS positives, auc, tpr, fpr, fnr, precision, f1, ece
        FROM label_metrics
    )
    UNPIVOT INCLUDE NULLS (value FOR family IN (positives, auc, tpr, fpr, fnr, precision, f1, ece))
    UNION ALL
    SELECT replicate, run_id, split, attribute, group_name, NULL, 'underdiagnosis', 'underdiagnosis',
           underdiagnosis, n
    FROM underdiagnosis
),
compared AS (
    SELECT
        replicate, run_id, split, attribute, label_name, family,
        coalesce('[' || label_name || ']', '') AS label_key,
        max(value) - min(value) AS gap,
        CASE WHEN family IN ('auc', 'tpr', 'precision', 'f1') THEN min(value) ELSE max(value) END AS worst,
        min(n) AS n,
        count(value) AS n_defined
    FROM groups
    WHERE attribute <> 'all' AND family <> 'positives'
    GROUP BY replicate, run_id, split, attribute, label_name, family
),
signed AS (
    SELECT
        replicate, run_id, split, attribute, label_name, family,
        coalesce('[' || label_name || ']', '') AS label_key,
        min(group_name) || '-' || max(group_name) AS direction,
        -- the _null forms keep a group's undefined (NULL) value: the difference is then undefined, not the other's
        arg_min_null(value, group_name) - arg_max_null(value, group_name) AS value,
        min(n) AS n
    FROM groups
    WHERE attribute <> 'all' AND family <> 'positives'
    GROUP BY replicate, run_id, split, attribute, label_name, family
    HAVING count(DISTINCT group_name) = 2
)
SELECT replicate, run_id, split, attribute, group_name AS group_or_gap, family, metric, value, n, label_name
FROM groups
UNION ALL
SELECT replicate, run_id, split, attribute, 'gap', family || '_gap', family || '_gap' || label_key, gap, n, label_name
FROM compared WHERE n_defined >= 2
UNION ALL
SELECT replicate, run_id, split, attribute, 'worst', family || '_worst', family || '_worst' || label_key, worst, n,
       label_name
FROM compared WHERE n_defined >= 2
UNION ALL
SELECT replicate, run_id, split, attribute, direction, family || '_diff', family || '_diff' || label_key, value, n,
       label_name
FROM signed;
