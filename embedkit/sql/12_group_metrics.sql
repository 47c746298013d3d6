-- group_metrics: every metric of every group, long (fairlearn MetricFrame's by_group, as a table), n beside each value.
-- Grain: one row per (replicate, run_id, split, attribute, group_name, metric).
-- Columns: replicate, run_id, split, attribute, group_name, family (the metric without its class), metric, value, n
--   (weighted rows in the group).
-- Metrics: accuracy, macro_f1, macro_f1_zd1, var_f1, ece, classwise_ece (mean over classes), l1_calibration,
--   macro_auc (mean of the defined per-class AUCs); per class (metric 'family[class]'): f1, tpr, fpr, auc,
--   classwise_ece.
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
per_class AS (
    UNPIVOT (SELECT replicate, run_id, split, attribute, group_name, class_name, n, f1, tpr, fpr FROM class_confusion)
    ON f1, tpr, fpr
    INTO NAME family VALUE value
)
SELECT replicate, run_id, split, attribute, group_name, family, family AS metric, value, n FROM utility
UNION ALL
SELECT replicate, run_id, split, attribute, group_name, family, family AS metric, value, n FROM calibration
UNION ALL
SELECT replicate, run_id, split, attribute, group_name, family, family || '[' || class_name || ']', value, n
FROM per_class
UNION ALL
SELECT replicate, run_id, split, attribute, group_name, 'auc', 'auc[' || class_name || ']', auc, n FROM class_auc
UNION ALL
SELECT replicate, run_id, split, attribute, group_name, 'macro_auc', 'macro_auc', avg(auc), max(n)
FROM class_auc GROUP BY ALL
UNION ALL
SELECT replicate, run_id, split, attribute, group_name, 'classwise_ece', 'classwise_ece[' || class_name || ']', ece, n
FROM class_calibration
UNION ALL
SELECT replicate, run_id, split, attribute, group_name, 'classwise_ece', 'classwise_ece', avg(ece), max(n)
FROM class_calibration GROUP BY ALL;
