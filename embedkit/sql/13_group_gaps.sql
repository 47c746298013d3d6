-- group_gaps: how far apart the groups of an attribute are, max minus min over its groups (the attribute 'all' has
-- one group and no gaps); n is the smallest compared group's size, the number that says how much a gap can be trusted.
-- Grain: one row per (replicate, run_id, split, attribute, metric).
-- Columns: replicate, run_id, split, attribute, family, metric, value, n, n_groups (groups with a defined value).
-- Metrics: f1_gap (of macro_f1), accuracy_gap, ece_gap, classwise_ece_gap, l1_calibration_gap (the paper's
--   |g1 - g2| for two groups), auc_gap (of macro_auc); equalized odds from per-class one-vs-rest rates on y_pred:
--   eqodds[class] = (|dTPR| + |dFPR|) / 2 with d = max - min over groups, eqodds (mean over classes) and
--   eqodds_worst (max over classes). A gap needs two groups with a defined value, else it is NULL.
CREATE OR REPLACE VIEW group_gaps AS
WITH spreads AS (
    SELECT
        replicate, run_id, split, attribute, family,
        CASE family WHEN 'macro_f1' THEN 'f1_gap' WHEN 'macro_auc' THEN 'auc_gap' ELSE family || '_gap' END AS metric,
        CASE WHEN count(value) >= 2 THEN max(value) - min(value) END AS value,
        min(n) AS n,
        count(value) AS n_groups
    FROM group_metrics
    WHERE attribute <> 'all'
      AND metric IN ('accuracy', 'macro_f1', 'ece', 'classwise_ece', 'l1_calibration', 'macro_auc')
    GROUP BY ALL
),
class_odds AS (
    SELECT
        replicate, run_id, split, attribute, class_name,
        (CASE WHEN count(tpr) >= 2 THEN max(tpr) - min(tpr) END
         + CASE WHEN count(fpr) >= 2 THEN max(fpr) - min(fpr) END) / 2 AS eqodds,
        min(n) AS n,
        least(count(tpr), count(fpr)) AS n_groups
    FROM class_confusion
    WHERE attribute <> 'all'
    GROUP BY ALL
)
SELECT replicate, run_id, split, attribute, family, metric, value, n, n_groups FROM spreads
UNION ALL
SELECT replicate, run_id, split, attribute, 'eqodds', 'eqodds[' || class_name || ']', eqodds, n, n_groups
FROM class_odds
UNION ALL
SELECT replicate, run_id, split, attribute, 'eqodds', 'eqodds', avg(eqodds), min(n), min(n_groups)
FROM class_odds GROUP BY ALL
UNION ALL
SELECT replicate, run_id, split, attribute, 'eqodds_worst', 'eqodds_worst', max(eqodds), min(n), min(n_groups)
FROM class_odds GROUP BY ALL;
