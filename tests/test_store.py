"""The store's rules: keyed upserts, width checks, runs visible only when complete."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedkit.store import schemas
from embedkit.store.store import StoreError, missing_data_file, resolve_store_path


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


def _runs_store(store) -> None:
    store.write_run({"run_id": "r1", "model": "m", "method": "lp", "config": {"classes": ["A", "B"]}},
                    _predictions("r1", 5))


def test_a_deleted_data_file_is_one_line_and_doctor_lists_it(store, monkeypatch, capsys):
    from conftest import main_cli
    from embedkit.store.doctor import examine

    _runs_store(store)
    (lost,) = (store.path / "predictions.lance" / "data").glob("*.lance")
    lost.unlink()
    (finding,) = examine(store)
    assert (finding.kind, finding.table, finding.rows, finding.repairable) == ("missing_data_file", "predictions", 5,
                                                                                False)
    assert finding.detail.startswith(f"data/{lost.name} is not on disk: restore the store from a backup, or drop it "
                                     "(`embedkit doctor --drop-table predictions --yes`")
    code, out, err = main_cli(monkeypatch, capsys, "--store", str(store.path), "doctor", "--repair")
    assert code == 1 and out.startswith("missing_data_file: predictions: 5 rows;") and "--repair" not in out, out
    # whatever reads the table (Lance here; DuckDB and pyarrow in the corpus, tests/hostile_store.py) says so
    with pytest.raises(Exception) as info:
        store.read("predictions")
    assert str(missing_data_file(info.value)) == (
        f"table 'predictions' in the store {store.path.absolute()} is missing its data file data/{lost.name} (deleted "
        f"or moved): nothing was changed; `embedkit --store {store.path.absolute()} doctor` lists the damaged tables "
        "and how to rebuild them")
    assert missing_data_file(ValueError("Not found: a.png")) is None


def test_a_reader_of_a_store_that_does_not_exist_is_refused(store, monkeypatch, capsys):
    from conftest import main_cli

    with pytest.raises(StoreError, match=r"^no store at .* \(the folder does not exist\): create one with"):
        store.require()
    store.path.mkdir()
    (store.path / "_logs").mkdir()  # bug logs and locks are not tables
    with pytest.raises(StoreError, match=r"\(the folder holds no tables\)"):
        store.require()
    code, out, err = main_cli(monkeypatch, capsys, "--store", str(store.path), "data", "info")
    assert code == 1 and out == "" and err.startswith(f"error: no store at {store.path} (the folder holds no")
    _runs_store(store)
    assert store.require() is store and store.table_names() == ["predictions", "runs"]
