"""The embedding store: LanceDB tables (images, embeddings, prompts, runs, predictions) in one directory.

store.py holds the write rules, schemas.py the tables' schemas, runs.py the runs (writing, selecting, deleting),
doctor.py the checks; docs/store.md describes the layout a user sees.
"""
