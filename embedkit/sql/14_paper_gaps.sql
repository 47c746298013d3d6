-- paper_gaps: the ISBI 2025 paper's own fairness numbers, for reproduction.
-- Grain: one row per (replicate, run_id, split, attribute, metric).
-- Columns: replicate, run_id, split, attribute, direction ('old-young', 'M-F', or 'a|b': the two groups compared),
--   family, metric, value, n (the smallest cell's size).
-- f1_delta_paper: signed and cell-averaged over the age x sex cells (attribute age_group_sex, whose groups read
--   '<age group>_<sex>'), each cell's F1 being macro-F1 with zero_division = 1: for age_group, the mean over the old
--   cells minus the mean over the young cells; for sex, the mean over age groups of (M - F).
-- eqodds_paper: for an attribute with exactly two groups a and b, the mean over classes of
--   (|TPR_a - TPR_b| + |FPR_a - FPR_b|) / 2.
CREATE OR REPLACE VIEW paper_gaps AS
WITH gm AS MATERIALIZED (
    SELECT replicate, run_id, split, attribute, group_name, family, metric, value, n
    FROM group_metrics
    WHERE family IN ('macro_f1_zd1', 'tpr', 'fpr')
),
cells AS (
    SELECT
        replicate, run_id, split, n, value AS f1,
        split_part(group_name, '_', 1) AS age_group,
        split_part(group_name, '_', 2) AS sex
    FROM gm
    WHERE attribute = 'age_group_sex' AND family = 'macro_f1_zd1'
),
age_delta AS (
    SELECT
        replicate, run_id, split, 'age_group' AS attribute,
        getvariable('age_group_old') || '-' || getvariable('age_group_young') AS direction,
        avg(f1) FILTER (WHERE age_group = getvariable('age_group_old'))
            - avg(f1) FILTER (WHERE age_group = getvariable('age_group_young')) AS value,
        min(n) AS n
    FROM cells
    GROUP BY ALL
),
sex_by_age AS (
    SELECT
        replicate, run_id, split, age_group,
        any_value(f1) FILTER (WHERE sex = getvariable('sex_male'))
            - any_value(f1) FILTER (WHERE sex = getvariable('sex_female')) AS delta,
        min(n) AS n
    FROM cells
    GROUP BY ALL
),
sex_delta AS (
    SELECT
        replicate, run_id, split, 'sex' AS attribute,
        getvariable('sex_male') || '-' || getvariable('sex_female') AS direction,
        avg(delta) AS value, min(n) AS n
    FROM sex_by_age
    GROUP BY ALL
),
rates AS (
    -- per (attribute, class): the two groups' TPR and FPR, for attributes with exactly two groups
    SELECT
        replicate, run_id, split, attribute, substr(metric, length(family) + 1) AS class_key,
        min(group_name) || '|' || max(group_name) AS direction,
        abs(arg_min(value, group_name) FILTER (WHERE family = 'tpr')
            - arg_max(value, group_name) FILTER (WHERE family = 'tpr')) AS tpr_diff,
        abs(arg_min(value, group_name) FILTER (WHERE family = 'fpr')
            - arg_max(value, group_name) FILTER (WHERE family = 'fpr')) AS fpr_diff,
        min(n) AS n,
        count(DISTINCT group_name) AS n_groups
    FROM gm
    WHERE family IN ('tpr', 'fpr') AND attribute <> 'all'
    GROUP BY replicate, run_id, split, attribute, class_key
)
SELECT replicate, run_id, split, attribute, direction, 'f1_delta_paper' AS family, 'f1_delta_paper' AS metric,
       value, n
FROM age_delta
UNION ALL
SELECT replicate, run_id, split, attribute, direction, 'f1_delta_paper', 'f1_delta_paper', value, n FROM sex_delta
UNION ALL
SELECT replicate, run_id, split, attribute, direction, 'eqodds_paper', 'eqodds_paper', avg((tpr_diff + fpr_diff) / 2),
       min(n)
FROM rates
WHERE n_groups = 2
GROUP BY ALL;
