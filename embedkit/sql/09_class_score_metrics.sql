-- class_score_metrics: what one class's scores (p_c, one-vs-rest) say in every group: ROC AUC and classwise ECE.
-- Both need the rows x classes table, so one pass computes both.
-- Grain: one row per (replicate, group_key, class_index) (group_key: see group_rows; class_metrics adds the names).
-- Columns: replicate, group_key, class_index, n, n_pos, n_neg,
--   auc: weighted Mann-Whitney: sum over (positive i, negative j) of w_i w_j ([s_i > s_j] + [s_i = s_j] / 2) / (P N),
--     ties counting 1/2 as in scikit-learn's roc_auc_score; NULL without positives or without negatives. Summing
--     w_i (W(< s_i) + W(<= s_i)) / 2 over the positives, W counting every row, also counts the positive-positive
--     pairs: exactly P^2 / 2, subtracted. W(<) and W(<=) are two frames of one sort.
--   ece: classwise ECE of p_c against y == c over the top-label ECE's bins ((b/B, (b+1)/B], 0 in the first):
--     sum over bins of |sum(y - p_c)| / n.
CREATE OR REPLACE VIEW class_score_metrics AS
WITH cumulative AS (
    SELECT
        replicate, group_key, class_index,
        weight::DOUBLE AS w,
        CASE WHEN is_true THEN weight::DOUBLE ELSE 0.0 END AS w_pos,
        score,
        least(greatest(ceil(score * getvariable('ece_bins'))::INTEGER - 1, 0), getvariable('ece_bins') - 1) AS bin,
        sum(weight::DOUBLE) OVER (
            PARTITION BY replicate, group_key, class_index ORDER BY score
            RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
        ) AS w_upto,
        coalesce(sum(weight::DOUBLE) OVER (
            PARTITION BY replicate, group_key, class_index ORDER BY score
            RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW EXCLUDE GROUP
        ), 0.0) AS w_below
    FROM class_scores
),
per_bin AS (
    SELECT
        replicate, group_key, class_index, bin,
        sum(w) AS n,
        sum(w_pos) AS n_pos,
        sum(w_pos * (w_below + w_upto)) / 2 AS pos_rank_sum,
        sum(w_pos - w * score) AS gap_sum
    FROM cumulative
    GROUP BY replicate, group_key, class_index, bin
),
per_class AS (
    SELECT
        replicate, group_key, class_index,
        sum(n) AS n, sum(n_pos) AS n_pos, sum(pos_rank_sum) AS pos_rank_sum,
        sum(abs(gap_sum)) / sum(n) AS ece
    FROM per_bin
    GROUP BY replicate, group_key, class_index
)
SELECT
    replicate, group_key, class_index,
    n::BIGINT AS n, n_pos::BIGINT AS n_pos, (n - n_pos)::BIGINT AS n_neg,
    CASE WHEN n_pos > 0 AND n > n_pos THEN (pos_rank_sum - n_pos * n_pos / 2) / (n_pos * (n - n_pos)) END AS auc,
    ece
FROM per_class;
