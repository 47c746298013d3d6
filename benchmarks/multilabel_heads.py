"""Multi-label heads at the full NIH size: embedkit's batched L-BFGS (all labels in one solve) against
scikit-learn's LogisticRegression looped over the labels (the baseline, same objective), then one lp epoch and the
val thresholds.

Vectors are synthesised directly (embedkit.data.synth_multilabel.synthetic_vectors, d=512 by default) for the
first --rows images of the NIH metadata under the ``nih`` protocol's patient-level split; no store is involved, so
the figures are the heads' own.

    .venv/bin/python benchmarks/multilabel_heads.py [--rows 112120] [--dim 512] [--metadata PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DEFAULT_METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih" / "Data_Entry_2017_v2020.csv.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=112_120)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--wd", type=float, default=1e-4)
    parser.add_argument("--metadata", type=Path, default=DEFAULT_METADATA)
    args = parser.parse_args()

    import torch
    from sklearn.linear_model import LogisticRegression

    from embedkit.data.cohort import _split_labels, cohort_labels
    from embedkit.data.synth_multilabel import multilabel_cohort, synthetic_vectors
    from embedkit.heads import multilabel as ml
    from embedkit.heads.batched import train_batched
    from embedkit.heads.logreg import fit_logreg

    torch.set_num_threads(2)
    rows = multilabel_cohort(args.metadata, args.rows)
    X = synthetic_vectors(rows, args.dim, seed=0)
    classes = cohort_labels(rows)
    Y = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for i, labels in enumerate(rows["labels"]):
        Y[i, [classes.index(v) for v in _split_labels(labels)]] = 1
    split = rows["split"].to_numpy()
    tr, va, te = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    print(f"{len(rows)} rows x d={args.dim}, {len(classes)} labels; train {len(tr)}, val {len(va)}, test {len(te)}")

    start = time.perf_counter()
    fit = fit_logreg(X[tr], Y[tr], len(classes), [args.wd], max_iter=100, tol=1e-4)
    ours_s = time.perf_counter() - start
    probs = ml.sigmoid(fit.logits(X)[0])

    start = time.perf_counter()
    ref_probs = np.empty_like(probs)
    for c in range(len(classes)):  # scikit-learn's own way: one binary problem per label, same objective
        ref = LogisticRegression(C=1 / (args.wd * len(tr)), max_iter=100, tol=1e-4).fit(X[tr], Y[tr, c])
        ref_probs[:, c] = ref.predict_proba(X)[:, 1]
    ref_s = time.perf_counter() - start
    gap = float(np.abs(probs - ref_probs).max())
    print(f"baseline  scikit-learn LogisticRegression x {len(classes)} labels: {ref_s:.2f} s")
    print(f"logreg    embedkit batched L-BFGS, all labels at once: {ours_s:.2f} s = {ref_s / ours_s:.1f}x the "
          f"baseline ({int(fit.n_iter[0])} iterations, converged {bool(fit.converged[0])}; max |p - p_sklearn| "
          f"{gap:.2e})")

    start = time.perf_counter()
    batched = train_batched(X[tr], Y[tr], X[va], Y[va], X, len(classes), "lp", 1024, 1, 64, [1e-4], [1e-5], [77])
    lp_s = time.perf_counter() - start
    print(f"lp        one epoch of Linear({args.dim},1024)->Linear(1024,{len(classes)}), BCE: {lp_s:.2f} s "
          f"({batched.flops / lp_s / 1e9:.1f} GFLOP/s)")

    start = time.perf_counter()
    thresholds = ml.choose_thresholds(probs[va], Y[va], "max_f1")
    auc = ml.label_auc(probs[te], Y[te])
    post_s = time.perf_counter() - start
    macro = np.mean([a for a in auc if a is not None])
    print(f"val thresholds (max_f1) + test AUC of {len(classes)} labels: {post_s:.2f} s; logreg test macro-AUC "
          f"{macro:.3f}, thresholds {min(thresholds):.3f}..{max(thresholds):.3f}")


if __name__ == "__main__":
    main()
