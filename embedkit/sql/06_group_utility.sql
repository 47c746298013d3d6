-- group_utility: utility of every group: accuracy, macro-F1 and the spread of per-class F1.
-- Grain: one row per (replicate, run_id, split, attribute, group_name).
-- Columns: replicate, run_id, split, attribute, group_name, n, accuracy, macro_f1 (mean over the run's classes of
--   class_confusion.f1), macro_f1_zd1 (same with zero_division=1, the paper's cell F1), var_f1 (sample variance,
--   ddof = 1, of the per-class F1 across classes: the paper's Var_F1).
CREATE OR REPLACE VIEW group_utility AS
WITH f1 AS (
    SELECT replicate, run_id, split, attribute, group_name,
           avg(f1) AS macro_f1, avg(f1_zd1) AS macro_f1_zd1, var_samp(f1) AS var_f1
    FROM class_confusion
    GROUP BY ALL
),
acc AS (
    SELECT replicate, run_id, split, attribute, group_name,
           sum(weight)::BIGINT AS n,
           sum(CASE WHEN y_true = y_pred THEN weight ELSE 0 END) / sum(weight)::DOUBLE AS accuracy
    FROM confusion_matrix
    GROUP BY ALL
)
SELECT a.replicate, a.run_id, a.split, a.attribute, a.group_name, a.n, a.accuracy, f.macro_f1, f.macro_f1_zd1, f.var_f1
FROM acc AS a
JOIN f1 AS f USING (replicate, run_id, split, attribute, group_name);
