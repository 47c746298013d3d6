"""Cohorts: manifests, NIH ChestX-ray14 protocols, image decoding, synthetic images."""
