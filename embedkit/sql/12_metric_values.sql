-- metric_values: every metric of every group, every gap between groups, and the paper's gaps; for the observed
-- sample (replicate 0) and each bootstrap replicate. The gap definitions live here, once; group_gaps and paper_gaps
-- show this view's gap rows.
-- Grain: one row per (replicate, run_id, split, attribute, group_or_gap, metric).
-- Columns: replicate, run_id, split, attribute, group_or_gap (the group for a group's value; 'gap' for a max - min gap;
--   the direction, e.g. 'old-young' or 'F|M', for the paper's gaps), family, metric, value, n (the group's size; for
--   a gap, the smallest compared group's: what says how far a gap can be trusted).
-- Gaps ('gap'): max - min over the attribute's groups, for every metric of group_metrics, named after its family
--   without 'macro_', then '_gap', then its class: f1_gap (of macro_f1), accuracy_gap, ece_gap, classwise_ece_gap,
--   l1_calibration_gap (the paper's |g1 - g2| for two groups), auc_gap (of macro_auc), f1_gap[class], tpr_gap[class],
--   ...; a gap needs two groups with a defined value (the attribute 'all', one group, has none).
-- Signed differences (attributes with exactly two groups, a < b by name; group_or_gap 'a-b', e.g. 'F-M'):
--   accuracy_diff, f1_diff (of macro_f1), ece_diff = value(a) - value(b): the direction a max - min gap hides, and
--   an estimate whose bootstrap distribution is not pushed upward the way |difference| is.
--   Equalized odds, one-vs-rest on y_pred: eqodds[class] = (tpr_gap[class] + fpr_gap[class]) / 2; eqodds is their
--   mean over classes (the paper's EqOdds for two groups), eqodds_worst their max, eqodds_classes how many classes
--   were averaged (a class whose TPR or FPR is undefined in all but one group has no eqodds[class]).
-- Paper: f1_delta_paper, signed and cell-averaged over the age x sex cells (attribute age_group_sex, groups
--   '<age group>_<sex>'), each cell's F1 being macro-F1 with zero_division = 1: for age_group the mean over the old
--   cells minus the mean over the young ones ('old-young'); for sex the mean over age groups of M - F ('M-F').
--   eqodds_paper: for an attribute with exactly two groups a and b ('a|b'), the mean over classes of
--   (|TPR_a - TPR_b| + |FPR_a - FPR_b|) / 2, over the classes defined in both groups (eqodds_paper_classes of
--   them): for two groups, eqodds_paper equals eqodds.
-- group_metrics is read once (materialized): its per-class AUC and ECE are the costly part of any query.
CREATE OR REPLACE VIEW metric_values AS
WITH gm AS MATERIALIZED (
    SELECT replicate, run_id, split, attribute, group_name, family, metric, value, n FROM group_metrics
),
spreads AS (
    SELECT
        replicate, run_id, split, attribute,
        replace(family, 'macro_', '') || '_gap' AS family,
        replace(family, 'macro_', '') || '_gap' || substr(metric, length(family) + 1) AS metric,
        substr(metric, length(family) + 1) AS class_key,
        max(value) - min(value) AS value,
        min(n) AS n
    FROM gm
    GROUP BY replicate, run_id, split, attribute, family, metric
    HAVING count(value) >= 2
),
class_odds AS (
    SELECT
        replicate, run_id, split, attribute, class_key,
        (any_value(value) FILTER (WHERE family = 'tpr_gap') + any_value(value) FILTER (WHERE family = 'fpr_gap')) / 2
            AS value,
        min(n) AS n
    FROM spreads
    WHERE family IN ('tpr_gap', 'fpr_gap')
    GROUP BY replicate, run_id, split, attribute, class_key
    HAVING count(*) = 2
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
    GROUP BY replicate, run_id, split
),
sex_by_age AS (
    SELECT
        replicate, run_id, split, age_group,
        any_value(f1) FILTER (WHERE sex = getvariable('sex_male'))
            - any_value(f1) FILTER (WHERE sex = getvariable('sex_female')) AS delta,
        min(n) AS n
    FROM cells
    GROUP BY replicate, run_id, split, age_group
),
sex_delta AS (
    SELECT
        replicate, run_id, split, 'sex' AS attribute,
        getvariable('sex_male') || '-' || getvariable('sex_female') AS direction,
        avg(delta) AS value, min(n) AS n
    FROM sex_by_age
    GROUP BY replicate, run_id, split
),
signed AS (
    -- an attribute with exactly two groups a < b (by name): the signed difference a - b beside the unsigned gap
    SELECT
        replicate, run_id, split, attribute,
        replace(family, 'macro_', '') || '_diff' AS family,
        replace(family, 'macro_', '') || '_diff' || substr(metric, length(family) + 1) AS metric,
        min(group_name) || '-' || max(group_name) AS direction,
        arg_min_null(value, group_name) - arg_max_null(value, group_name) AS value,
        min(n) AS n
    FROM gm
    WHERE attribute <> 'all' AND family IN ('accuracy', 'macro_f1', 'ece')
    GROUP BY replicate, run_id, split, attribute, family, metric
    HAVING count(DISTINCT group_name) = 2
),
two_group_rates AS (
    -- per (attribute, class) of an attribute with exactly two groups: |TPR_a - TPR_b| and |FPR_a - FPR_b|
    SELECT
        replicate, run_id, split, attribute, substr(metric, length(family) + 1) AS class_key,
        min(group_name) || '|' || max(group_name) AS direction,
        -- the _null forms keep a group's undefined (NULL) rate: arg_min would skip it and take the other group's
        -- rate twice, counting a class absent from one group as a zero difference
        abs(arg_min_null(value, group_name) FILTER (WHERE family = 'tpr')
            - arg_max_null(value, group_name) FILTER (WHERE family = 'tpr')) AS tpr_diff,
        abs(arg_min_null(value, group_name) FILTER (WHERE family = 'fpr')
            - arg_max_null(value, group_name) FILTER (WHERE family = 'fpr')) AS fpr_diff,
        min(n) AS n,
        count(DISTINCT group_name) AS n_groups
    FROM gm
    WHERE family IN ('tpr', 'fpr') AND attribute <> 'all'
    GROUP BY replicate, run_id, split, attribute, class_key
)
SELECT replicate, run_id, split, attribute, group_name AS group_or_gap, family, metric, value, n FROM gm
UNION ALL
SELECT replicate, run_id, split, attribute, 'gap', family, metric, value, n FROM spreads
UNION ALL
SELECT replicate, run_id, split, attribute, direction, family, metric, value, n FROM signed
UNION ALL
SELECT replicate, run_id, split, attribute, 'gap', 'eqodds', 'eqodds' || class_key, value, n FROM class_odds
UNION ALL
SELECT replicate, run_id, split, attribute, 'gap', 'eqodds', 'eqodds', avg(value), min(n)
FROM class_odds GROUP BY replicate, run_id, split, attribute
UNION ALL
SELECT replicate, run_id, split, attribute, 'gap', 'eqodds_worst', 'eqodds_worst', max(value), min(n)
FROM class_odds GROUP BY replicate, run_id, split, attribute
UNION ALL
SELECT replicate, run_id, split, attribute, 'gap', 'eqodds_classes', 'eqodds_classes', count(value), min(n)
FROM class_odds GROUP BY replicate, run_id, split, attribute
UNION ALL
SELECT replicate, run_id, split, attribute, direction, 'f1_delta_paper', 'f1_delta_paper', value, n FROM age_delta
UNION ALL
SELECT replicate, run_id, split, attribute, direction, 'f1_delta_paper', 'f1_delta_paper', value, n FROM sex_delta
UNION ALL
SELECT replicate, run_id, split, attribute, direction, 'eqodds_paper', 'eqodds_paper',
       avg((tpr_diff + fpr_diff) / 2), min(n)
FROM two_group_rates
WHERE n_groups = 2
GROUP BY replicate, run_id, split, attribute, direction
UNION ALL
SELECT replicate, run_id, split, attribute, direction, 'eqodds_paper_classes', 'eqodds_paper_classes',
       count((tpr_diff + fpr_diff) / 2), min(n)
FROM two_group_rates
WHERE n_groups = 2
GROUP BY replicate, run_id, split, attribute, direction;
