-- class_auc: one-vs-rest ROC AUC of every class in every group (score p_c, positive y_true = c).
-- Grain: one row per (replicate, run_id, split, attribute, group_name, class_index).
-- Columns: replicate, run_id, split, attribute, group_name, class_index, n, n_pos, n_neg,
--   auc (NULL when the group lacks positives or negatives of the class).
-- The Mann-Whitney form, weighted: AUC = sum over (positive i, negative j) of w_i w_j ([s_i > s_j] + [s_i = s_j] / 2)
-- / (P N), ties counting 1/2 as in scikit-learn's roc_auc_score. Summing w_i (W(< s_i) + W(= s_i) / 2) over the
-- positives, W counting every row (W(= s_i) includes i), also counts the positive-positive pairs: exactly P^2 / 2,
-- which is subtracted. W(<) and W(<=) share one sort (same partition and order, two frames).
CREATE OR REPLACE VIEW class_auc AS
WITH cumulative AS (
    SELECT
        replicate, run_id, split, attribute, group_name, class_index,
        weight::DOUBLE AS w,
        CASE WHEN is_true THEN weight::DOUBLE ELSE 0.0 END AS w_pos,
        sum(weight::DOUBLE) OVER (
            PARTITION BY replicate, run_id, split, attribute, group_name, class_index ORDER BY score
            RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
        ) AS w_upto,
        coalesce(sum(weight::DOUBLE) OVER (
            PARTITION BY replicate, run_id, split, attribute, group_name, class_index ORDER BY score
            RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW EXCLUDE GROUP
        ), 0.0) AS w_below
    FROM class_scores
),
sums AS (
    SELECT
        replicate, run_id, split, attribute, group_name, class_index,
        sum(w) AS n,
        sum(w_pos) AS n_pos,
        sum(w_pos * (w_below + w_upto)) / 2 AS pos_rank_sum
    FROM cumulative
    GROUP BY ALL
)
SELECT
    replicate, run_id, split, attribute, group_name, class_index,
    n::BIGINT AS n, n_pos::BIGINT AS n_pos, (n - n_pos)::BIGINT AS n_neg,
    CASE WHEN n_pos > 0 AND n > n_pos THEN (pos_rank_sum - n_pos * n_pos / 2) / (n_pos * (n - n_pos)) END AS auc
FROM sums;
