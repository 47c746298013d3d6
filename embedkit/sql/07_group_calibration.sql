-- group_calibration: calibration of every group.
-- Grain: one row per (replicate, run_id, split, attribute, group_name).
-- Columns: replicate, run_id, split, attribute, group_name, n,
--   ece: top-label expected calibration error, sum over bins of |sum(correct - confidence)| / n;
--   l1_calibration: the paper's, per class mean |p_c - y_c| (y one-hot) averaged over classes, i.e. the mean of
--   predictions_base.l1_error (the paper's code took logits; embedkit takes probabilities).
CREATE OR REPLACE VIEW group_calibration AS
SELECT
    replicate, run_id, split, attribute, group_name,
    sum(n)::BIGINT AS n,
    sum(abs(gap_sum)) / sum(n) AS ece,
    sum(l1_sum) / sum(n) AS l1_calibration
FROM calibration_bins
GROUP BY replicate, run_id, split, attribute, group_name;
