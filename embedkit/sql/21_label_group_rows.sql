-- label_group_rows: group membership of the label-level rows, long: every scored (prediction, label) once per
-- attribute it has a value for, plus once in the single group of the attribute 'all'; and again once per bootstrap
-- replicate that draws its row (the multi-label twin of group_rows, joined to the same resample_weights).
-- Grain: one row per (replicate, run_id, split, attribute, group_name, row_id, label_index).
-- Columns: replicate (0 = the observed sample), run_id, split, attribute, group_name, row_id, unit_id, label_index,
--   label_name, score, y, pred, diseased, weight (the row's multiplicity in that replicate), group_key (hash of
--   run_id, split, attribute, group_name, as in group_rows).
-- The attribute list is the connection's ({{attribute_columns}}); rows with y NULL (no label list) are not scored.
-- A replicate draws patients, not labels: all of a row's labels carry the same multiplicity.
CREATE OR REPLACE VIEW label_group_rows AS
WITH members AS NOT MATERIALIZED (
    UNPIVOT (
        SELECT
            run_id, split, row_id, unit_id, label_index, label_name, score, y, pred, diseased, weight,
            'all' AS "all",
            {{attribute_casts}}
        FROM label_predictions
        WHERE y IS NOT NULL
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
