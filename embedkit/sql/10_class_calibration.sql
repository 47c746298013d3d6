-- class_calibration: classwise expected calibration error of every group: for class c, the ECE of p_c against
-- y == c over the same equal-width bins as the top-label ECE (bin b holds (b/B, (b+1)/B], 0 in the first).
-- Grain: one row per (replicate, run_id, split, attribute, group_name, class_index).
-- Columns: replicate, run_id, split, attribute, group_name, class_index, n, ece.
CREATE OR REPLACE VIEW class_calibration AS
WITH bins AS (
    SELECT
        replicate, run_id, split, attribute, group_name, class_index,
        least(greatest(ceil(score * getvariable('ece_bins'))::INTEGER - 1, 0), getvariable('ece_bins') - 1) AS bin,
        sum(weight)::DOUBLE AS n,
        sum(weight * (is_true::INTEGER - score)) AS gap_sum
    FROM class_scores
    GROUP BY ALL
)
SELECT replicate, run_id, split, attribute, group_name, class_index,
       sum(n)::BIGINT AS n, sum(abs(gap_sum)) / sum(n) AS ece
FROM bins
GROUP BY ALL;
