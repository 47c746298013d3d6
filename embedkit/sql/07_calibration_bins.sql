-- calibration_bins: the reliability diagram of every group, top-label: confidence = max(probs), correct = y_pred = y_true.
-- Grain: one row per (replicate, run_id, split, attribute, group_name, bin) for the bins that hold a row.
-- Columns: replicate, run_id, split, attribute, group_name, bin (0 .. getvariable('ece_bins') - 1; equal-width bins on
--   [0, 1], bin b holds (b/B, (b+1)/B], and 0 joins the first bin), n, confidence (mean), accuracy (mean of correct),
--   gap_sum (sum of weight * (correct - confidence): its absolute value over the group's n is the bin's ECE share).
CREATE OR REPLACE VIEW calibration_bins AS
SELECT
    replicate, run_id, split, attribute, group_name,
    least(greatest(ceil(confidence * getvariable('ece_bins'))::INTEGER - 1, 0), getvariable('ece_bins') - 1) AS bin,
    sum(weight)::BIGINT AS n,
    sum(weight * confidence) / sum(weight) AS confidence,
    sum(CASE WHEN correct THEN weight ELSE 0 END) / sum(weight)::DOUBLE AS accuracy,
    sum(weight * (correct::INTEGER - confidence)) AS gap_sum
FROM group_rows
GROUP BY ALL;
