-- class_scores: every group member once per class, with that class's probability (one-vs-rest scores).
-- Grain: one row per (replicate, run_id, split, attribute, group_name, row_id, class_index).
-- Columns: replicate, group_key (stands for run_id, split, attribute, group_name; see group_rows), row_id,
--   class_index (position in probs, 0-based: the index into run_classes), score (p_c), is_true (y_true = class_index),
--   weight. The largest table of all (rows x attributes x classes), so it carries integer keys only.
-- SET VARIABLE class_scores = false empties it: AUC and classwise ECE become NULL and every query skips their cost
-- (`embedkit fairness` does so: its table shows neither).
CREATE OR REPLACE VIEW class_scores AS
SELECT replicate, group_key, row_id, class_index, score, (y_true = class_index) AS is_true, weight
FROM (
    SELECT
        replicate, group_key, row_id, y_true, weight,
        (generate_subscripts(probs, 1) - 1)::INTEGER AS class_index,
        unnest(probs)::DOUBLE AS score
    FROM group_rows
    WHERE getvariable('class_scores') IS DISTINCT FROM false
);
