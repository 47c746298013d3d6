-- paper_gaps: the ISBI 2025 paper's own fairness numbers, for reproduction.
-- Grain: one row per (replicate, run_id, split, attribute, metric).
-- Columns: replicate, run_id, split, attribute, direction ('old-young', 'M-F', or the two groups compared as 'a|b'),
--   family, metric, value, n (the smallest cell's size).
-- f1_delta_paper: signed and cell-averaged over the age x sex cells (attribute age_group_sex, whose groups read
--   '<age group>_<sex>'), each cell's F1 being macro-F1 with zero_division = 1: for age_group, the mean over the old
--   cells minus the mean over the young cells; for sex, the mean over age groups of (M - F).
-- eqodds_paper: for an attribute with exactly two groups a and b, the mean over classes of
--   (|TPR_a - TPR_b| + |FPR_a - FPR_b|) / 2.
CREATE OR REPLACE VIEW paper_gaps AS
WITH cells AS (
    SELECT
        replicate, run_id, split, n, macro_f1_zd1 AS f1,
        split_part(group_name, '_', 1) AS age_group,
        split_part(group_name, '_', 2) AS sex
    FROM group_utility
    WHERE attribute = 'age_group_sex'
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
two_groups AS (
    SELECT replicate, run_id, split, attribute
    FROM group_utility
    WHERE attribute <> 'all'
    GROUP BY ALL
    HAVING count(*) = 2
),
pairs AS (
    SELECT
        c.replicate, c.run_id, c.split, c.attribute, c.class_index,
        min(c.group_name) || '|' || max(c.group_name) AS direction,
        (abs(arg_min(c.tpr, c.group_name) - arg_max(c.tpr, c.group_name))
         + abs(arg_min(c.fpr, c.group_name) - arg_max(c.fpr, c.group_name))) / 2 AS eqodds,
        min(c.n) AS n
    FROM class_confusion AS c
    SEMI JOIN two_groups AS t USING (replicate, run_id, split, attribute)
    GROUP BY ALL
)
SELECT replicate, run_id, split, attribute, direction, 'f1_delta_paper' AS family, 'f1_delta_paper' AS metric,
       value, n
FROM age_delta
UNION ALL
SELECT replicate, run_id, split, attribute, direction, 'f1_delta_paper', 'f1_delta_paper', value, n FROM sex_delta
UNION ALL
SELECT replicate, run_id, split, attribute, direction, 'eqodds_paper', 'eqodds_paper', avg(eqodds), min(n)
FROM pairs
GROUP BY ALL;
