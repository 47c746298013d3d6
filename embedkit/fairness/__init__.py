"""Fairness metrics over the store: a DuckDB connection with SQL views (db), bootstrap intervals (bootstrap)."""
