-- label_predictions: every prediction of a multi-label run once per label, scored against the image's label list.
-- Grain: one row per (run_id, row_id, label_index) of a committed run whose config says "task": "multilabel".
-- Columns: every column of predictions_base (demographics, age_group, age_decade, the intersections, unit_id,
--   weight, ...; y_true and y_pred are NULL in such a run), then
--   label_index (0-based position in probs and in the config's "classes"), label_name (the class; 'No Finding' is
--   one), score (the label's sigmoid score, probs[label_index]), threshold (the config's "thresholds"[label_index],
--   chosen on validation by the head), y (label_name is in images.labels), pred (score >= threshold),
--   diseased (the image has a label other than getvariable('no_finding'): the denominator of underdiagnosis).
-- A row whose label list is NULL or empty has y and diseased NULL: it is not scored (as y_true NULL in a
-- multi-class run). Scope (scope_runs, scope_split) comes from predictions_base: the bootstrap sets it as for the
-- multi-class views.
CREATE OR REPLACE VIEW label_predictions AS
WITH multilabel_runs AS (
    SELECT
        run_id,
        from_json(json_extract(config, '$.classes'), '["VARCHAR"]') AS classes,
        from_json(json_extract(config, '$.thresholds'), '["DOUBLE"]') AS thresholds
    FROM runs
    WHERE json_extract_string(config, '$.task') = 'multilabel'
),
expanded AS (
    SELECT b.*, unnest(range(len(b.probs)))::INTEGER AS label_index, r.classes, r.thresholds
    FROM predictions_base AS b
    JOIN multilabel_runs AS r ON r.run_id = b.run_id
)
SELECT
    e.* EXCLUDE (classes, thresholds),
    e.classes[e.label_index + 1] AS label_name,
    e.probs[e.label_index + 1]::DOUBLE AS score,
    e.thresholds[e.label_index + 1] AS threshold,
    CASE WHEN len(e.labels) > 0 THEN list_contains(e.labels, e.classes[e.label_index + 1]) END AS y,
    (e.probs[e.label_index + 1]::DOUBLE >= e.thresholds[e.label_index + 1]) AS pred,
    CASE WHEN len(e.labels) > 0 THEN len(list_filter(e.labels, lambda l: l <> getvariable('no_finding'))) > 0 END
        AS diseased
FROM expanded AS e;
