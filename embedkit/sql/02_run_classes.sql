-- run_classes: the class order of every run (y_true, y_pred and the positions in probs index into it).
-- Grain: one row per (run_id, class_index).
-- Columns: run_id, class_index (0-based), class_name (from the run's config "classes"; 'class_<i>' when the config
--   names none, counting as many classes as the run's longest probs list).
CREATE OR REPLACE VIEW run_classes AS
WITH named AS (
    SELECT
        r.run_id,
        from_json(json_extract(r.config, '$.classes'), '["VARCHAR"]') AS classes
    FROM runs AS r
),
widths AS (
    SELECT run_id, max(len(probs)) AS n_classes FROM predictions GROUP BY run_id
),
lists AS (
    SELECT
        w.run_id,
        coalesce(
            CASE WHEN len(n.classes) > 0 THEN n.classes END,
            list_transform(range(w.n_classes), lambda k: 'class_' || k)
        ) AS classes
    FROM widths AS w
    LEFT JOIN named AS n ON n.run_id = w.run_id
)
SELECT
    run_id,
    (generate_subscripts(classes, 1) - 1)::INTEGER AS class_index,
    unnest(classes) AS class_name
FROM lists;
