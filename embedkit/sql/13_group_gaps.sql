-- group_gaps: how far apart the groups of an attribute are: max minus min over its groups, for every metric of
-- group_metrics, and equalized odds. n is the smallest compared group's size (what says how far a gap can be trusted).
-- Grain: one row per (replicate, run_id, split, attribute, metric).
-- Columns: replicate, run_id, split, attribute, family, metric, value, n, n_groups (groups with a defined value).
-- Names: the metric's family without 'macro_', then '_gap', then its class if any: f1_gap (of macro_f1), accuracy_gap,
--   ece_gap, classwise_ece_gap, l1_calibration_gap (the paper's |g1 - g2| for two groups), auc_gap (of macro_auc),
--   f1_gap[class], tpr_gap[class], ... Equalized odds, one-vs-rest on y_pred: eqodds[class] = (tpr_gap[class] +
--   fpr_gap[class]) / 2, eqodds (mean over classes) and eqodds_worst (max over classes).
-- A gap needs two groups with a defined value: with fewer (e.g. the attribute 'all') there is no row.
CREATE OR REPLACE VIEW group_gaps AS
WITH spreads AS MATERIALIZED (
    SELECT
        replicate, run_id, split, attribute,
        replace(family, 'macro_', '') || '_gap' AS family,
        replace(family, 'macro_', '') || '_gap' || substr(metric, length(family) + 1) AS metric,
        max(value) - min(value) AS value,
        min(n) AS n,
        count(value) AS n_groups
    FROM group_metrics
    GROUP BY replicate, run_id, split, attribute, family, metric
    HAVING count(value) >= 2
),
class_odds AS (
    SELECT
        t.replicate, t.run_id, t.split, t.attribute,
        'eqodds' || substr(t.metric, length('tpr_gap') + 1) AS metric,
        (t.value + f.value) / 2 AS value,
        least(t.n, f.n) AS n,
        least(t.n_groups, f.n_groups) AS n_groups
    FROM spreads AS t
    JOIN spreads AS f
        ON f.replicate = t.replicate AND f.run_id = t.run_id AND f.split = t.split AND f.attribute = t.attribute
       AND f.family = 'fpr_gap' AND substr(f.metric, length('fpr_gap') + 1) = substr(t.metric, length('tpr_gap') + 1)
    WHERE t.family = 'tpr_gap'
)
SELECT replicate, run_id, split, attribute, family, metric, value, n, n_groups FROM spreads
UNION ALL
SELECT replicate, run_id, split, attribute, 'eqodds', metric, value, n, n_groups FROM class_odds
UNION ALL
SELECT replicate, run_id, split, attribute, 'eqodds', 'eqodds', avg(value), min(n), min(n_groups)
FROM class_odds GROUP BY ALL
UNION ALL
SELECT replicate, run_id, split, attribute, 'eqodds_worst', 'eqodds_worst', max(value), min(n), min(n_groups)
FROM class_odds GROUP BY ALL;
