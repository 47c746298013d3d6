-- group_rows: group membership, long: every prediction once per attribute it has a value for, plus once in the
-- single group of the attribute 'all'; and again once per bootstrap replicate that draws it.
-- Grain: one row per (replicate, run_id, split, attribute, group_name, row_id).
-- Columns: replicate (0 = the observed sample; 1.. = bootstrap replicates from resample_weights), run_id, split,
--   attribute ('all' or a column of predictions_base), group_name (the column's value as text), row_id, unit_id,
--   y_true, y_pred, probs, confidence, correct, l1_error, weight (multiplicity of the row in that replicate),
--   group_key (hash of run_id, split, attribute, group_name: one integer to partition by where sorting on the four
--   text columns would dominate the cost, as in class_score_metrics; a collision needs two of a store's groups, not
--   rows, to share a 64-bit hash).
-- The attribute list is filled in when the connection is made ({{attribute_columns}}); a NULL value leaves the row
-- out of that attribute only. Rows without a single label (y_true NULL) are not scored: no metric counts them.
-- Replicates are drawn per attribute (stratified by its groups), so resample_weights is
-- keyed by attribute; it is keyed by split and row_id, not run, so runs compared side by side share the same draws.
CREATE OR REPLACE VIEW group_rows AS
WITH members AS NOT MATERIALIZED (
    UNPIVOT (
        SELECT
            run_id, split, row_id, unit_id, y_true, y_pred, probs, confidence, correct, l1_error, weight,
            'all' AS "all",
            {{attribute_casts}}
        FROM predictions_base
        WHERE y_true IS NOT NULL
    )
    ON "all", {{attribute_columns}}
    INTO NAME attribute VALUE group_name
)
SELECT 0 AS replicate, m.*, hash(m.run_id, m.split, m.attribute, m.group_name) AS group_key
FROM members AS m
UNION ALL
SELECT w.replicate, m.* REPLACE (m.weight * w.multiplicity AS weight),
       hash(m.run_id, m.split, m.attribute, m.group_name) AS group_key
FROM members AS m
JOIN resample_weights AS w
    ON w.attribute = m.attribute AND w.split = m.split AND w.row_id = m.row_id;
