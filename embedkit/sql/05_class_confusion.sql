-- class_confusion: one-vs-rest counts and rates per class (positive prediction: y_pred is the class), per group.
-- Grain: one row per (replicate, run_id, split, attribute, group_name, class_index).
-- Columns: replicate, run_id, split, attribute, group_name, group_key, class_index, class_name, n (rows in the group),
--   correct (rows with y_pred = y_true in the group), support (rows of the class), tp, fp, fn, tn,
--   tpr (recall), fpr, precision (NULL where undefined: 0/0),
--   f1 = 2tp / (2tp + fp + fn), 0 where that is 0/0 (scikit-learn's zero_division=0),
--   f1_zd1: the same with 1 where it is 0/0 (the paper's zero_division=1).
-- Every class of the run has a row, also where the group never shows it (then f1 = 0, f1_zd1 = 1).
CREATE OR REPLACE VIEW class_confusion AS
WITH counts AS (
    SELECT
        m.replicate, m.run_id, m.split, m.attribute, m.group_name, m.group_key, k.class_index, k.class_name,
        sum(m.weight)::BIGINT AS n,
        sum(CASE WHEN m.y_true = m.y_pred THEN m.weight ELSE 0 END)::BIGINT AS correct,
        sum(CASE WHEN m.y_true = k.class_index AND m.y_pred = k.class_index THEN m.weight ELSE 0 END)::BIGINT AS tp,
        sum(CASE WHEN m.y_true <> k.class_index AND m.y_pred = k.class_index THEN m.weight ELSE 0 END)::BIGINT AS fp,
        sum(CASE WHEN m.y_true = k.class_index AND m.y_pred <> k.class_index THEN m.weight ELSE 0 END)::BIGINT AS fn
    FROM confusion_matrix AS m
    JOIN run_classes AS k ON k.run_id = m.run_id
    GROUP BY m.replicate, m.run_id, m.split, m.attribute, m.group_name, m.group_key, k.class_index, k.class_name
)
SELECT
    replicate, run_id, split, attribute, group_name, group_key, class_index, class_name, n, correct,
    tp + fn AS support, tp, fp, fn, n - tp - fp - fn AS tn,
    tp / nullif(tp + fn, 0)::DOUBLE AS tpr,
    fp / nullif(n - tp - fn, 0)::DOUBLE AS fpr,
    tp / nullif(tp + fp, 0)::DOUBLE AS precision,
    coalesce(2 * tp / nullif(2 * tp + fp + fn, 0)::DOUBLE, 0.0) AS f1,
    coalesce(2 * tp / nullif(2 * tp + fp + fn, 0)::DOUBLE, 1.0) AS f1_zd1
FROM counts;
