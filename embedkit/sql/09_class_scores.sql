-- class_scores: every group member once per class, with that class's probability (one-vs-rest scores).
-- Grain: one row per (replicate, run_id, split, attribute, group_name, row_id, class_index).
-- Columns: replicate, run_id, split, attribute, group_name, row_id, class_index (position in probs, 0-based, the
--   index into run_classes), score (p_c), is_true (y_true = class_index), weight.
-- The class name is joined later, on the small per-group tables: this view is the largest one (rows x classes).
CREATE OR REPLACE VIEW class_scores AS
SELECT
    replicate, run_id, split, attribute, group_name, row_id, class_index, score,
    (y_true = class_index) AS is_true,
    weight
FROM (
    SELECT
        replicate, run_id, split, attribute, group_name, row_id, y_true, weight,
        (generate_subscripts(probs, 1) - 1)::INTEGER AS class_index,
        unnest(probs)::DOUBLE AS score
    FROM group_rows
);
