-- calibration_bins: the top-label reliability diagram of every group
-- (confidence = max(probs), correct = y_pred = y_true).
-- Grain: one row per (replicate, run_id, split, attribute, group_name, bin), for the bins that hold a row.
-- Columns: replicate, run_id, split, attribute, group_name, bin (0 .. getvariable('ece_bins') - 1: equal-width bins on
--   [0, 1], bin b holding (b/B, (b+1)/B], 0 joining the first), n, confidence (mean), accuracy (mean of correct),
--   gap_sum (sum of weight * (correct - confidence); |gap_sum| / the group's n is the bin's share of the ECE),
--   l1_sum (sum of weight * l1_error; kept here so that group_calibration reads the rows once).
CREATE OR REPLACE VIEW calibration_bins AS
SELECT
    replicate, run_id, split, attribute, group_name,
    least(greatest(ceil(confidence * getvariable('ece_bins'))::INTEGER - 1, 0), getvariable('ece_bins') - 1) AS bin,
    sum(weight)::BIGINT AS n,
    sum(weight * confidence) / sum(weight) AS confidence,
    sum(CASE WHEN correct THEN weight ELSE 0 END) / sum(weight)::DOUBLE AS accuracy,
    sum(weight * (correct::INTEGER - confidence)) AS gap_sum,
    sum(weight * l1_error) AS l1_sum
FROM group_rows
GROUP BY replicate, run_id, split, attribute, group_name, bin;
