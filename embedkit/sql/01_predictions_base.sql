-- predictions_base: every prediction beside its image's demographics and its run's model and method.
-- Grain: one row per prediction, i.e. per (run_id, row_id) of a committed run (one with a `runs` row: the commit
--   marker); predictions whose row_id is not in `images` are dropped.
-- Columns: run_id, model, method, row_id, image_id, split, y_true, y_pred (indices into the run's classes), probs,
--   confidence (top-label probability), correct (y_pred = y_true),
--   l1_error (mean over classes of |p_c - y_c|, y one-hot),
--   every other column of `images` (cohort, path, labels, label, age, sex, view, patient_id, extra, ...),
--   age_group (recomputed from age: old from getvariable('age_old_from') on, so 60 is old),
--   age_group_sex ('old_M', ...),
--   age_decade (NIH's age decades: '0-9', '10-19', ..., from age), age_decade_sex ('60-69_F', ...),
--   unit_id (the resampling unit of the bootstrap: the patient, else the row), weight (the row's multiplicity: 1 here;
--   group_rows multiplies it by a bootstrap replicate's count, so every metric view below is written once for both).
-- The stored images.age_group is ignored on purpose: one age boundary, set once per connection, decides everywhere.
-- Scope: getvariable('scope_runs') (a list of run_ids) and getvariable('scope_split') restrict every view to those
-- runs and that split when set (NULL: everything). The bootstrap sets them: a filter written on the last view does not
-- always reach the scans through the views' aggregates, and a replicate of every run in the store costs.
CREATE OR REPLACE VIEW predictions_base AS
SELECT
    j.*,
    j.age_group || '_' || j.sex AS age_group_sex,
    j.age_decade || '_' || j.sex AS age_decade_sex,
    coalesce(j.patient_id, j.row_id) AS unit_id,
    1::BIGINT AS weight
FROM (
    SELECT
        p.run_id,
        r.model,
        r.method,
        p.row_id,
        p.image_id,
        p.split,
        p.y_true,
        p.y_pred,
        p.probs,
        list_max(p.probs)::DOUBLE AS confidence,
        (p.y_pred = p.y_true) AS correct,
        list_sum(list_transform(p.probs, lambda q, i: abs(q::DOUBLE - CASE WHEN i = p.y_true + 1 THEN 1 ELSE 0 END)))
            / len(p.probs) AS l1_error,
        i.* EXCLUDE (row_id, image_id, split, age_group),
        CASE
            WHEN i.age IS NULL THEN NULL
            WHEN i.age >= getvariable('age_old_from') THEN getvariable('age_group_old')
            ELSE getvariable('age_group_young')
        END AS age_group,
        (10 * (floor(i.age)::BIGINT // 10))::VARCHAR || '-' || (10 * (floor(i.age)::BIGINT // 10) + 9)::VARCHAR AS age_decade
    FROM predictions AS p
    JOIN images AS i ON i.row_id = p.row_id
    JOIN runs AS r ON r.run_id = p.run_id
    WHERE (getvariable('scope_runs') IS NULL OR list_contains(getvariable('scope_runs'), p.run_id))
      AND (getvariable('scope_split') IS NULL OR p.split = getvariable('scope_split'))
) AS j;
