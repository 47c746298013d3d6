-- group_calibration: calibration of every group.
-- Grain: one row per (replicate, run_id, split, attribute, group_name).
-- Columns: replicate, run_id, split, attribute, group_name, n, ece (top-label expected calibration error:
--   sum over bins of |sum(correct - confidence)| / n), l1_calibration (the paper's: per class mean |p_c - y_c|, y one-hot,
--   averaged over classes; equal to the mean of predictions_base.l1_error).
CREATE OR REPLACE VIEW group_calibration AS
WITH ece AS (
    SELECT replicate, run_id, split, attribute, group_name,
           sum(n)::BIGINT AS n, sum(abs(gap_sum)) / sum(n) AS ece
    FROM calibration_bins
    GROUP BY ALL
),
l1 AS (
    SELECT replicate, run_id, split, attribute, group_name,
           sum(weight * l1_error) / sum(weight) AS l1_calibration
    FROM group_rows
    GROUP BY ALL
)
SELECT e.replicate, e.run_id, e.split, e.attribute, e.group_name, e.n, e.ece, l.l1_calibration
FROM ece AS e
JOIN l1 AS l USING (replicate, run_id, split, attribute, group_name);
