-- confusion_matrix: the multi-class confusion matrix of every group (cells that hold no row are absent).
-- Grain: one row per (replicate, run_id, split, attribute, group_name, y_true, y_pred).
-- Columns: replicate, run_id, split, attribute, group_name, group_key, y_true, y_pred, weight (weighted row count).
-- Every count-based metric (accuracy, F1, TPR, FPR, equalized odds) derives from this small table.
CREATE OR REPLACE VIEW confusion_matrix AS
SELECT replicate, run_id, split, attribute, group_name, group_key, y_true, y_pred, sum(weight)::BIGINT AS weight
FROM group_rows
GROUP BY replicate, run_id, split, attribute, group_name, group_key, y_true, y_pred;
