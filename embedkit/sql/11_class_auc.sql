-- class_auc: one-vs-rest ROC AUC of every class in every group (score p_c, positive y_true = c).
-- Grain: one row per (replicate, run_id, split, attribute, group_name, class_index).
-- Columns: replicate, run_id, split, attribute, group_name, class_index, class_name, n, n_pos, n_neg,
--   auc (NULL when the group lacks positives or negatives of the class).
-- The Mann-Whitney form, weighted: AUC = sum over (positive i, negative j) of w_i w_j ([s_i > s_j] + 0.5 [s_i = s_j])
-- over (P N). Summing w_i (W(< s_i) + W(= s_i) / 2) over positives with W counting every row counts the
-- positive-positive pairs too, exactly P^2 / 2, which is subtracted. Ties get 1/2, as in scikit-learn's roc_auc_score.
CREATE OR REPLACE VIEW class_auc AS
WITH per_score AS (
    SELECT
        replicate, run_id, split, attribute, group_name, class_index, class_name, score,
        sum(CASE WHEN is_true THEN weight ELSE 0 END) AS w_pos,
        sum(weight) AS w_all
    FROM class_scores
    GROUP BY ALL
),
cumulative AS (
    SELECT
        *,
        -- scores are distinct after the grouping above, so a ROWS frame counts W(<= s).
        sum(w_all) OVER (
            PARTITION BY replicate, run_id, split, attribute, group_name, class_index
            ORDER BY score
            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
        ) AS w_upto
    FROM per_score
),
sums AS (
    SELECT
        replicate, run_id, split, attribute, group_name, class_index, class_name,
        sum(w_all)::DOUBLE AS n,
        sum(w_pos)::DOUBLE AS n_pos,
        sum(w_pos * (w_upto - 0.5 * w_all))::DOUBLE AS pos_rank_sum
    FROM cumulative
    GROUP BY ALL
)
SELECT
    replicate, run_id, split, attribute, group_name, class_index, class_name,
    n::BIGINT AS n, n_pos::BIGINT AS n_pos, (n - n_pos)::BIGINT AS n_neg,
    CASE WHEN n_pos > 0 AND n > n_pos THEN (pos_rank_sum - 0.5 * n_pos * n_pos) / (n_pos * (n - n_pos)) END AS auc
FROM sums;
