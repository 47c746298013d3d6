-- label_metrics: every per-label metric of every group, side by side.
-- Grain: one row per (replicate, run_id, split, attribute, group_name, label_index).
-- Columns: the columns of label_confusion (n, positives, tp, fp, fn, tn, tpr, fnr, fpr, precision, f1), then auc and
--   ece from label_score_metrics.
CREATE OR REPLACE VIEW label_metrics AS
SELECT c.*, s.auc, s.ece
FROM label_confusion AS c
LEFT JOIN label_score_metrics AS s
    ON s.replicate = c.replicate AND s.group_key = c.group_key AND s.label_index = c.label_index;
