-- group_metrics: every metric of every group, long (fairlearn MetricFrame's by_group, as a table), n beside each value.
-- Grain: one row per (replicate, run_id, split, attribute, group_name, metric).
-- Columns: replicate, run_id, split, attribute, group_name, family (the metric without its class), metric, value, n
--   (weighted rows in the group).
-- Metrics: accuracy, macro_f1, macro_f1_zd1, var_f1 (group_utility); ece, l1_calibration (group_calibration);
--   per class, as 'family[class]': f1, tpr, fpr (class_confusion), auc (class_auc), classwise_ece
--   (class_calibration); and macro_auc, classwise_ece: the mean over classes of the defined per-class values.
-- Each source view is read once (GROUPING SETS give a class's row and the mean over classes in one pass).
CREATE OR REPLACE VIEW group_metrics AS
WITH utility AS (
    UNPIVOT (SELECT replicate, run_id, split, attribute, group_name, n, accuracy, macro_f1, macro_f1_zd1, var_f1
             FROM group_utility)
    ON accuracy, macro_f1, macro_f1_zd1, var_f1
    INTO NAME family VALUE value
),
calibration AS (
    UNPIVOT (SELECT replicate, run_id, split, attribute, group_name, n, ece, l1_calibration FROM group_calibration)
    ON ece, l1_calibration
    INTO NAME family VALUE value
),
rates AS (
    UNPIVOT (SELECT replicate, run_id, split, attribute, group_name, class_name, n, f1, tpr, fpr FROM class_confusion)
    ON f1, tpr, fpr
    INTO NAME family VALUE value
),
auc AS (
    SELECT replicate, run_id, split, attribute, group_name, class_index, avg(auc) AS value, max(n) AS n
    FROM class_auc
    GROUP BY GROUPING SETS (
        (replicate, run_id, split, attribute, group_name, class_index),
        (replicate, run_id, split, attribute, group_name)
    )
),
classwise_ece AS (
    SELECT replicate, run_id, split, attribute, group_name, class_index, avg(ece) AS value, max(n) AS n
    FROM class_calibration
    GROUP BY GROUPING SETS (
        (replicate, run_id, split, attribute, group_name, class_index),
        (replicate, run_id, split, attribute, group_name)
    )
)
SELECT replicate, run_id, split, attribute, group_name, family, family AS metric, value, n FROM utility
UNION ALL
SELECT replicate, run_id, split, attribute, group_name, family, family AS metric, value, n FROM calibration
UNION ALL
SELECT replicate, run_id, split, attribute, group_name, family, family || '[' || class_name || ']', value, n FROM rates
UNION ALL
SELECT a.replicate, a.run_id, a.split, a.attribute, a.group_name,
       CASE WHEN a.class_index IS NULL THEN 'macro_auc' ELSE 'auc' END,
       CASE WHEN a.class_index IS NULL THEN 'macro_auc' ELSE 'auc[' || k.class_name || ']' END,
       a.value, a.n
FROM auc AS a
LEFT JOIN run_classes AS k ON k.run_id = a.run_id AND k.class_index = a.class_index
UNION ALL
SELECT c.replicate, c.run_id, c.split, c.attribute, c.group_name, 'classwise_ece',
       CASE WHEN c.class_index IS NULL THEN 'classwise_ece' ELSE 'classwise_ece[' || k.class_name || ']' END,
       c.value, c.n
FROM classwise_ece AS c
LEFT JOIN run_classes AS k ON k.run_id = c.run_id AND k.class_index = c.class_index;
