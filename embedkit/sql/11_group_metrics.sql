-- group_metrics: every metric of every group, long (fairlearn MetricFrame's by_group as a table), n beside each value.
-- Grain: one row per (replicate, run_id, split, attribute, group_name, metric).
-- Columns: replicate, run_id, split, attribute, group_name, family (the metric without its class), metric, value, n
--   (weighted rows in the group). A value undefined in a group (0/0, e.g. TPR without positives) is NULL.
-- Metrics per group: accuracy; macro_f1 (mean over ALL the run's classes of f1: a class the group neither shows nor
--   is predicted to show scores 0); macro_f1_zd1 (the paper's: mean over the classes present in the group's labels or
--   predictions of f1_zd1, what scikit-learn's f1_score(average='macro', zero_division=1) computes); var_f1 (sample
--   variance, ddof = 1, of the per-class F1 across classes: the paper's Var_F1); macro_auc and classwise_ece (mean
--   over classes of the defined per-class values); ece and l1_calibration (group_calibration).
-- Metrics per class, named 'family[class]': f1, tpr, fpr, auc, classwise_ece.
-- class_metrics is read once: GROUPING SETS give a class's row and its group's row in one pass.
CREATE OR REPLACE VIEW group_metrics AS
WITH both_levels AS (
    SELECT
        replicate, run_id, split, attribute, group_name, class_index,
        any_value(class_name) AS class_name,
        max(n) AS n,
        max(correct) / nullif(max(n), 0)::DOUBLE AS accuracy,  -- correct is the group's, repeated on each class row
        avg(f1) AS f1,
        avg(f1_zd1) FILTER (WHERE support > 0 OR tp + fp > 0) AS f1_zd1,
        var_samp(f1) AS var_f1,
        avg(tpr) AS tpr,
        avg(fpr) AS fpr,
        avg(auc) AS auc,
        avg(classwise_ece) AS classwise_ece
    FROM class_metrics
    GROUP BY GROUPING SETS (
        (replicate, run_id, split, attribute, group_name, class_index),
        (replicate, run_id, split, attribute, group_name)
    )
),
per_group AS (
    SELECT *
    FROM (
        SELECT replicate, run_id, split, attribute, group_name, n,
               accuracy,
               f1 AS macro_f1, f1_zd1 AS macro_f1_zd1, var_f1, auc AS macro_auc, classwise_ece
        FROM both_levels
        WHERE class_index IS NULL
    )
    UNPIVOT INCLUDE NULLS (value FOR family IN (accuracy, macro_f1, macro_f1_zd1, var_f1, macro_auc, classwise_ece))
),
per_class AS (
    SELECT *
    FROM (
        SELECT replicate, run_id, split, attribute, group_name, class_name, n, f1, tpr, fpr, auc, classwise_ece
        FROM both_levels
        WHERE class_index IS NOT NULL
    )
    UNPIVOT INCLUDE NULLS (value FOR family IN (f1, tpr, fpr, auc, classwise_ece))
),
calibration AS (
    SELECT *
    FROM (SELECT replicate, run_id, split, attribute, group_name, n, ece, l1_calibration FROM group_calibration)
    UNPIVOT INCLUDE NULLS (value FOR family IN (ece, l1_calibration))
)
SELECT replicate, run_id, split, attribute, group_name, family, family AS metric, value, n FROM per_group
UNION ALL
SELECT replicate, run_id, split, attribute, group_name, family, family || '[' || class_name || ']', value, n
FROM per_class
UNION ALL
SELECT replicate, run_id, split, attribute, group_name, family, family AS metric, value, n FROM calibration;
