"""Heads off the stored vectors: zero-shot, linear probe, MLP, logistic regression, and batched sweeps.

Nothing here touches an image file: every head reads one (model, cohort, weights_id) slice of the embedding
store (:mod:`embedkit.heads.vectors`) and writes one ``runs`` row plus one ``predictions`` row per cohort row
(:mod:`embedkit.store.runs`).
"""
