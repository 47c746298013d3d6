-- underdiagnosis: Seyyed-Kalantari et al. (Nature Medicine 2021): the rate at which patients who have a disease
-- are predicted to have none, per group.
-- Grain: one row per (replicate, run_id, split, attribute, group_name) of a multi-label run.
-- Columns: replicate, run_id, split, attribute, group_name, n (weighted diseased rows: a label other than
--   getvariable('no_finding') in images.labels), underdiagnosed (those whose No Finding score reaches the No
--   Finding threshold: predicted 'No Finding'), underdiagnosis = underdiagnosed / n (NULL without diseased rows).
-- With NIH's labels (No Finding exactly when nothing else) this is the No Finding label's FPR in label_metrics.
-- A run whose classes lack No Finding has no row.
CREATE OR REPLACE VIEW underdiagnosis AS
SELECT
    replicate, run_id, split, attribute, group_name,
    sum(weight)::BIGINT AS n,
    sum(CASE WHEN pred THEN weight ELSE 0 END)::BIGINT AS underdiagnosed,
    sum(CASE WHEN pred THEN weight ELSE 0 END) / nullif(sum(weight), 0)::DOUBLE AS underdiagnosis
FROM label_group_rows
WHERE label_name = getvariable('no_finding') AND diseased
GROUP BY replicate, run_id, split, attribute, group_name;
