-- paper_gaps: the ISBI 2025 paper's own gaps, for reproduction (definitions: metric_values).
-- Grain: one row per (replicate, run_id, split, attribute, metric).
-- Columns: replicate, run_id, split, attribute, direction ('old-young', 'M-F', or 'a|b': the two groups compared),
--   metric (f1_delta_paper, eqodds_paper), value, n (the smallest cell's size).
CREATE OR REPLACE VIEW paper_gaps AS
SELECT replicate, run_id, split, attribute, group_or_gap AS direction, metric, value, n
FROM metric_values
WHERE family IN ('f1_delta_paper', 'eqodds_paper');
