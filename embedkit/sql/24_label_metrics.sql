-- label_metrics: every per-label metric of every group, side by side.
-- Grain: one row per (replicate, run_id, split, attribute, group_name, label_index).
-- Columns: replicate, run_id, split, attribute, group_name, group_key, label_index, label_name, n (weighted rows in
--   the group), positives (tp + fn), tp, fp, fn, tn (positive prediction: score >= the label's threshold; positive
--   truth: the label is in the image's list),
--   tpr = tp / (tp + fn), fnr = fn / (tp + fn) (NULL without positives), fpr = fp / (fp + tn) (NULL without
--   negatives), precision = tp / (tp + fp) (NULL without positive predictions),
--   f1 = 2tp / (2tp + fp + fn), 0 where that is 0/0 (scikit-learn's zero_division=0),
--   auc and ece (label_counts).
CREATE OR REPLACE VIEW label_metrics AS
WITH counts AS (
    SELECT g.run_id, g.split, g.attribute, g.group_name, g.label_name, c.*, c.positives - c.tp AS fn
    FROM label_counts AS c
    JOIN label_groups AS g ON g.group_key = c.group_key AND g.label_index = c.label_index
)
SELECT
    replicate, run_id, split, attribute, group_name, group_key, label_index, label_name, n,
    positives, tp, fp, fn, n - tp - fp - fn AS tn,
    tp / nullif(tp + fn, 0)::DOUBLE AS tpr,
    fn / nullif(tp + fn, 0)::DOUBLE AS fnr,
    fp / nullif(n - tp - fn, 0)::DOUBLE AS fpr,
    tp / nullif(tp + fp, 0)::DOUBLE AS precision,
    coalesce(2 * tp / nullif(2 * tp + fp + fn, 0)::DOUBLE, 0.0) AS f1,
    auc, ece
FROM counts;
