-- class_metrics: every per-class metric of every group, side by side.
-- Grain: one row per (replicate, run_id, split, attribute, group_name, class_index).
-- Columns: the columns of class_confusion (n, correct, support, tp, fp, fn, tn, tpr, fpr, precision, f1, f1_zd1), then
--   auc and classwise_ece from class_score_metrics (NULL where the run's probs lack the class).
CREATE OR REPLACE VIEW class_metrics AS
SELECT c.*, s.auc, s.ece AS classwise_ece
FROM class_confusion AS c
LEFT JOIN class_score_metrics AS s
    ON s.replicate = c.replicate AND s.group_key = c.group_key AND s.class_index = c.class_index;
