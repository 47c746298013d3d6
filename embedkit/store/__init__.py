"""The embedding store: LanceDB tables (images, embeddings, prompts, runs, predictions) in one directory."""
