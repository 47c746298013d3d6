-- label_counts: what each label's scores and predictions say in every group, in one pass over label_group_rows:
-- the confusion counts, ROC AUC and the label's ECE (a second pass for the counts would double the bootstrap's cost).
-- Grain: one row per (replicate, group_key, label_index) (group_key: see label_group_rows; label_metrics adds the
--   names).
-- Columns: replicate, group_key, label_index, n (weighted rows), positives, tp, fp (pred: score >= the label's
--   threshold; y: the label is in the image's list),
--   auc: the weighted Mann-Whitney statistic of class_score_metrics, ties counting 1/2 as in scikit-learn's
--     roc_auc_score; NULL without positives or without negatives. Rows are first summed per distinct score (a tie
--     is one row), so one running sum gives W(<= s) and W(< s) = W(<= s) - W(= s) without a second frame.
--   ece: the label's calibration over the bins of every ECE here ((b/B, (b+1)/B], 0 in the first, B =
--     getvariable('ece_bins')): sum over bins of |sum(y - score)| / n.
-- pred is a function of the score within a (run, label), so the counts ride along the per-score sums.
CREATE OR REPLACE VIEW label_counts AS
WITH by_score AS (
    SELECT
        replicate, group_key, label_index, score,
        bool_or(pred) AS pred,
        sum(weight)::DOUBLE AS w,
        sum(CASE WHEN y THEN weight ELSE 0 END)::DOUBLE AS w_pos
    FROM label_group_rows
    GROUP BY replicate, group_key, label_index, score
),
cumulative AS (
    SELECT
        *,
        least(greatest(ceil(score * getvariable('ece_bins'))::INTEGER - 1, 0), getvariable('ece_bins') - 1) AS bin,
        sum(w) OVER (
            PARTITION BY replicate, group_key, label_index ORDER BY score
            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
        ) AS w_upto
    FROM by_score
),
per_bin AS (
    SELECT
        replicate, group_key, label_index, bin,
        sum(w) AS n,
        sum(w_pos) AS n_pos,
        sum(CASE WHEN pred THEN w_pos ELSE 0 END) AS tp,
        sum(CASE WHEN pred THEN w - w_pos ELSE 0 END) AS fp,
        sum(w_pos * (2 * w_upto - w)) / 2 AS pos_rank_sum,
        sum(w_pos - w * score) AS gap_sum
    FROM cumulative
    GROUP BY replicate, group_key, label_index, bin
),
per_label AS (
    SELECT
        replicate, group_key, label_index,
        sum(n) AS n, sum(n_pos) AS n_pos, sum(tp) AS tp, sum(fp) AS fp, sum(pos_rank_sum) AS pos_rank_sum,
        sum(abs(gap_sum)) / sum(n) AS ece
    FROM per_bin
    GROUP BY replicate, group_key, label_index
)
SELECT
    replicate, group_key, label_index,
    n::BIGINT AS n, n_pos::BIGINT AS positives, tp::BIGINT AS tp, fp::BIGINT AS fp,
    CASE WHEN n_pos > 0 AND n > n_pos THEN (pos_rank_sum - n_pos * n_pos / 2) / (n_pos * (n - n_pos)) END AS auc,
    ece
FROM per_label;
