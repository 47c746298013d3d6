-- label_confusion: each label's confusion counts and rates in every group (positive prediction: pred, i.e.
-- score >= the label's threshold; positive truth: y, the label is in the image's list).
-- Grain: one row per (replicate, run_id, split, attribute, group_name, label_index).
-- Columns: replicate, run_id, split, attribute, group_name, group_key, label_index, label_name, n (weighted rows in
--   the group), positives (tp + fn), tp, fp, fn, tn,
--   tpr = tp / (tp + fn), fnr = fn / (tp + fn) (NULL without positives), fpr = fp / (fp + tn) (NULL without
--   negatives), precision = tp / (tp + fp) (NULL without positive predictions),
--   f1 = 2tp / (2tp + fp + fn), 0 where that is 0/0 (scikit-learn's zero_division=0).
CREATE OR REPLACE VIEW label_confusion AS
WITH counts AS (
    SELECT
        replicate, run_id, split, attribute, group_name, group_key, label_index,
        any_value(label_name) AS label_name,
        sum(weight)::BIGINT AS n,
        sum(CASE WHEN y AND pred THEN weight ELSE 0 END)::BIGINT AS tp,
        sum(CASE WHEN NOT y AND pred THEN weight ELSE 0 END)::BIGINT AS fp,
        sum(CASE WHEN y AND NOT pred THEN weight ELSE 0 END)::BIGINT AS fn
    FROM label_group_rows
    GROUP BY replicate, run_id, split, attribute, group_name, group_key, label_index
)
SELECT
    replicate, run_id, split, attribute, group_name, group_key, label_index, label_name, n,
    tp + fn AS positives, tp, fp, fn, n - tp - fp - fn AS tn,
    tp / nullif(tp + fn, 0)::DOUBLE AS tpr,
    fn / nullif(tp + fn, 0)::DOUBLE AS fnr,
    fp / nullif(n - tp - fn, 0)::DOUBLE AS fpr,
    tp / nullif(tp + fp, 0)::DOUBLE AS precision,
    coalesce(2 * tp / nullif(2 * tp + fp + fn, 0)::DOUBLE, 0.0) AS f1
FROM counts;
