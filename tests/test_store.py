"""The store's rules: keyed upserts, width checks, runs visible only when complete."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedkit.store import schemas
from embedkit.store.store import StoreError, resolve_store_path


def _vectors(n: int, dim: int, weights_id: str = "w") -> pa.Table:
    rows = [{"row_id": f"c/{i}", "cohort": "c", "image_id": str(i), "model": "m", "weights_id": weights_id,
             "vector": np.full(dim, i, dtype=np.float32).tolist(), "label": "A", "age": 50, "age_group": "young",
             "sex": "M", "view": "PA", "patient_id": str(i), "split": "train"} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=schemas.embeddings_schema(dim))


def test_upsert_replaces_rows_with_the_same_key(store):
    schema = schemas.embeddings_schema(4)
    store.upsert("emb_m", _vectors(5, 4), ["row_id", "weights_id"], schema)
    store.upsert("emb_m", _vectors(8, 4), ["row_id", "weights_id"], schema)
    store.upsert("emb_m", _vectors(3, 4, "other"), ["row_id", "weights_id"], schema)
    assert store.count("emb_m") == 11
    assert store.count("emb_m", "weights_id = 'other'") == 3


def test_vector_width_mismatch_is_a_clear_error(store):
    store.upsert("emb_m", _vectors(2, 4), ["row_id", "weights_id"], schemas.embeddings_schema(4))
    with pytest.raises(StoreError, match="holds vectors of width 4, but these vectors have width 8"):
        store.upsert("emb_m", _vectors(2, 8), ["row_id", "weights_id"], schemas.embeddings_schema(8))
    assert store.count("emb_m") == 2


def _predictions(run_id: str, n: int) -> pa.Table:
    return pa.Table.from_pylist(
        [{"run_id": run_id, "row_id": f"c/{i}", "image_id": str(i), "split": "test", "y_true": 0, "y_pred": 1,
          "probs": [0.4, 0.6]} for i in range(n)], schema=schemas.PREDICTIONS)


def test_write_run_replaces_leftovers_of_a_killed_attempt_and_delete_run(store):
    store.append("predictions", _predictions("r1", 7), schemas.PREDICTIONS)  # a killed attempt: no runs row
    store.write_run({"run_id": "r1", "model": "m", "method": "lp", "config": {"classes": ["A", "B"]}}, _predictions("r1", 5))
    assert store.count("predictions", "run_id = 'r1'") == 5
    assert store.read("runs")["config"].to_pylist() == ['{"classes": ["A", "B"]}']
    store.delete_run("r1")
    assert store.count("runs") == 0 and store.count("predictions") == 0
    with pytest.raises(StoreError, match="no run 'r1'"):
        store.delete_run("r1")


def test_store_path_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("EMBEDKIT_STORE", raising=False)
    assert str(resolve_store_path()) == "embedkit-store"
    monkeypatch.setenv("EMBEDKIT_STORE", str(tmp_path))
    assert resolve_store_path() == tmp_path
    assert resolve_store_path(tmp_path / "x") == tmp_path / "x"


def test_reading_an_absent_table_says_so(store):
    with pytest.raises(StoreError, match="table 'runs' does not exist"):
        store.read("runs")


# ---- dropping a table: `embedkit doctor --drop-table` ----------------------------------------------------------


def _doctor(store, *args):
    from typer.testing import CliRunner

    from embedkit.cli import app

    return CliRunner().invoke(app, ["--store", str(store.path), "doctor", *args])


def test_the_width_message_names_the_drop_command_and_the_command_drops_the_table(store):
    store.upsert("emb_m", _vectors(2, 4), ["row_id", "weights_id"], schemas.embeddings_schema(4))
    with pytest.raises(StoreError, match="embedkit doctor --drop-table emb_m") as refused:
        store.upsert("emb_m", _vectors(2, 8), ["row_id", "weights_id"], schemas.embeddings_schema(8))
    assert "embedkit sql" not in str(refused.value)
    result = _doctor(store, "--drop-table", "emb_m")
    assert result.exit_code == 0, result.output
    assert "dropped emb_m" in result.output and not store.has("emb_m")
    store.upsert("emb_m", _vectors(2, 8), ["row_id", "weights_id"], schemas.embeddings_schema(8))
    assert store.count("emb_m") == 2


def test_drop_table_refuses_unknown_tables_naming_the_ones_there(store):
    store.upsert("emb_m", _vectors(2, 4), ["row_id", "weights_id"], schemas.embeddings_schema(4))
    result = _doctor(store, "--drop-table", "emb_nope")
    assert result.exit_code != 0 and isinstance(result.exception, StoreError)
    assert "no table 'emb_nope'" in str(result.exception) and "emb_m" in str(result.exception)
    assert store.has("emb_m")


def test_a_core_table_needs_yes_and_runs_go_with_their_predictions(store):
    store.write_run({"run_id": "r1", "model": "m", "method": "lp", "config": {}}, _predictions("r1", 5))
    refused = _doctor(store, "--drop-table", "runs")
    assert refused.exit_code != 0 and isinstance(refused.exception, StoreError)
    assert "core table" in str(refused.exception) and "--yes" in str(refused.exception)
    assert store.count("runs") == 1 and store.count("predictions") == 5
    result = _doctor(store, "--drop-table", "predictions", "--yes")
    assert result.exit_code == 0, result.output
    assert not store.has("runs") and not store.has("predictions")


def test_drop_table_waits_for_no_embedding_pass(store):
    from embedkit.store.store import StoreBusy

    store.upsert("emb_m", _vectors(2, 4), ["row_id", "weights_id"], schemas.embeddings_schema(4))
    with store.embedding_lock("m", "w", "c"):  # a pass of model m is writing
        result = _doctor(store, "--drop-table", "emb_m")
        assert isinstance(result.exception, StoreBusy) and store.has("emb_m")
    assert _doctor(store, "--drop-table", "emb_m").exit_code == 0 and not store.has("emb_m")
