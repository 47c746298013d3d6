-- class_scores: every group member once per class, with that class's probability (one-vs-rest scores).
-- Grain: one row per (replicate, run_id, split, attribute, group_name, row_id, class_index).
-- Columns: replicate, run_id, split, attribute, group_name, row_id, class_index, class_name, score (p_c),
--   is_true (y_true = class_index), weight.
CREATE OR REPLACE VIEW class_scores AS
SELECT
    g.replicate, g.run_id, g.split, g.attribute, g.group_name, g.row_id,
    k.class_index, k.class_name,
    g.probs[k.class_index + 1]::DOUBLE AS score,
    (g.y_true = k.class_index) AS is_true,
    g.weight
FROM group_rows AS g
JOIN run_classes AS k ON k.run_id = g.run_id;
