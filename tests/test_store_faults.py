"""The store never reports what did not happen: kills and I/O errors at every gap between writes, and racing writers.

Each command runs as a real process with EMBEDKIT_FAULT (embedkit/store/store.py): "kill:N" SIGKILLs it at its
N-th fault point, "enospc:N" makes that point fail with "No space left on device". Fault points sit before and
after every table write, so N = 1, 2, ... reaches every gap, until a command finishes before its N-th point.
After every fault the store must hold no visible orphan or duplicate (views, `embedkit sql`, export), and a plain
rerun must end with exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.fairness import db
from embedkit.store.store import FAULT_ENV, Store
from heads_synth import write_vectors

MODEL = "tiny-clip"
ROWS = 1200  # heads_synth's cohort
PROBE = ["probe", "--model", MODEL, "--head", "lp", "--epochs", "2", "--hidden", "16", "--seed", "1",
         "--threads", "1", "--json"]
SWEEP = ["sweep", "--model", MODEL, "--head", "lp", "--grid", "lr=1e-3,1e-2", "--seeds", "0-1", "--epochs", "2",
         "--hidden", "16", "--threads", "1", "--quiet", "--json"]


def _cli(store_dir: Path, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    """The command in its own process (a kill must kill a process), or in this one for an injected I/O error: the
    same entry point (embedkit.cli.main, which turns errors into one line) without the cost of a start-up."""
    if fault and not fault.startswith("kill"):
        return _in_process(store_dir, args, fault)
    env = {**os.environ, FAULT_ENV: fault} if fault else {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    return subprocess.run([sys.executable, "-m", "embedkit.cli", "--store", str(store_dir), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def _in_process(store_dir: Path, args: list[str], fault: str) -> subprocess.CompletedProcess:
    import contextlib
    import io

    import torch

    from embedkit import cli
    from embedkit.store import store as store_module

    out, err, code = io.StringIO(), io.StringIO(), 0
    threads, argv = torch.get_num_threads(), sys.argv
    os.environ[FAULT_ENV], store_module._fault_count = fault, 0
    sys.argv = ["embedkit", "--store", str(store_dir), *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        del os.environ[FAULT_ENV]
        sys.argv = argv
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _vector_store(path: Path) -> Path:
    write_vectors(Store(path), MODEL, 32)
    return path


def assert_consistent(store_dir: Path, tmp_path: Path) -> int:
    """Every visible run has all its predictions, once; nothing else is visible anywhere. Returns the run count."""
    store = Store(store_dir)
    runs = store.read("runs", columns=["run_id"])["run_id"].to_pylist() if store.has("runs") else []
    if not store.has("predictions"):
        assert not runs
        return 0
    tables = {name: store.dataset(name) for name in store.table_names()}
    if "runs" not in tables:  # killed before the runs table existed: the predictions view shows nothing
        con = db.connect_tables(tables, with_views=False)
        assert con.sql("SELECT count(*) FROM predictions").fetchall()[0][0] == 0
        return 0
    con = db.connect_tables(tables)
    per_run = dict(con.sql("SELECT run_id, count(*) FROM predictions GROUP BY run_id").fetchall())
    assert per_run == {r: ROWS for r in runs}, "a visible run is incomplete, or predictions without a run are seen"
    assert con.sql("SELECT count(*) FROM (SELECT DISTINCT run_id, row_id FROM predictions)").fetchall()[0][0] == \
        ROWS * len(runs)
    for view in ("predictions_base", "fairness_summary"):
        seen = {r[0] for r in con.sql(f"SELECT DISTINCT run_id FROM {view}").fetchall()}
        assert seen == set(runs), view
    out = tmp_path / f"export-{len(list(tmp_path.glob('export-*')))}"
    if runs:
        result = CliRunner().invoke(app, ["--store", str(store_dir), "export", "--parquet", str(out)])
        assert result.exit_code == 0, result.output
        exported = pq.read_table(out / "tables" / "predictions.parquet")
        assert exported.num_rows == ROWS * len(runs)
        assert set(pq.read_table(out / "views" / "fairness_summary.parquet")["run_id"].to_pylist()) == set(runs)
    return len(runs)


def _probs(store_dir: Path) -> np.ndarray:
    """Every stored prediction's probabilities, ordered by (config, seed, row): comparable across stores."""
    store = Store(store_dir)
    con = db.connect_tables({name: store.dataset(name) for name in store.table_names()})
    rows = con.sql("SELECT p.probs FROM predictions p JOIN runs r USING (run_id) "
                   "ORDER BY json_extract_string(r.config, '$.lr'), r.seed, p.row_id").fetchall()
    return np.asarray([r[0] for r in rows], dtype=np.float32)


def _faults_then_rerun(tmp_path: Path, args: list[str], kind: str, runs_expected: int) -> int:
    """Inject ``kind`` at every fault point in turn (a fresh store each time), check the store after the fault and
    after a plain rerun against an uninterrupted run. Returns how many fault points there were."""
    reference = _vector_store(tmp_path / "reference")
    done = _cli(reference, args)
    assert done.returncode == 0, done.stderr
    expected = _probs(reference)
    point = 0
    while True:
        point += 1
        store_dir = _vector_store(tmp_path / f"{kind}-{point}")
        faulted = _cli(store_dir, args, f"{kind}:{point}")
        if faulted.returncode == 0:  # finished before reaching this point: every gap has been visited
            break
        if kind == "kill":
            assert faulted.returncode == -9, faulted.stderr
        else:
            assert faulted.returncode == 1 and "Traceback" not in faulted.stderr, faulted.stderr
            assert faulted.stderr.startswith("error: No space left on device"), faulted.stderr
        # all or nothing: the batch is invisible, or (a fault after the runs commit) visible whole
        assert assert_consistent(store_dir, tmp_path) in (0, runs_expected)
        rerun = _in_process(store_dir, args, "")  # only the faulted run needs a process of its own
        assert rerun.returncode == 0, rerun.stderr
        assert assert_consistent(store_dir, tmp_path) == runs_expected
        np.testing.assert_array_equal(_probs(store_dir), expected)
        # the rerun's commit removed the leftovers: the stored table holds exactly the visible rows
        assert Store(store_dir).count("predictions") == ROWS * runs_expected
    return point - 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kill", "enospc"])
def test_probe_faults_at_every_write_leave_nothing_visible_and_a_rerun_completes(tmp_path, kind):
    assert _faults_then_rerun(tmp_path, PROBE, kind, runs_expected=1) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kill", "enospc"])
def test_sweep_faults_at_every_write_leave_nothing_visible_and_a_rerun_completes(tmp_path, kind):
    assert _faults_then_rerun(tmp_path, SWEEP, kind, runs_expected=4) >= 4


def test_leftovers_are_invisible_and_the_next_commit_removes_them(tmp_path):
    """A writer that dies between its two commits: its predictions never show, the next run commit deletes them."""
    store_dir = _vector_store(tmp_path / "s")
    killed = _cli(store_dir, PROBE, "kill:3")  # points 1-2 around the predictions append, 3 before the runs row
    assert killed.returncode == -9
    store = Store(store_dir)
    assert store.count("predictions") == ROWS and store.count("runs") == 0
    assert store.pending_runs(), "the journal names the run in flight"
    result = CliRunner().invoke(app, ["--store", str(store_dir), "sql", "--format", "csv",
                                      "SELECT count(*) AS n FROM predictions"])
    assert result.exit_code == 0 and result.output.splitlines()[-1] == "0", result.output
    assert _cli(store_dir, PROBE).returncode == 0
    assert Store(store_dir).count("predictions") == ROWS and not Store(store_dir).pending_runs()


def test_a_run_id_is_written_once(store):
    import pyarrow as pa

    from embedkit.store import schemas
    from embedkit.store.store import StoreError

    preds = pa.table({"run_id": ["r"], "row_id": ["a"], "image_id": ["a"], "split": ["test"], "y_true": [0],
                      "y_pred": [0], "probs": [[1.0, 0.0]]})
    store.write_run({"run_id": "r", "model": "m", "method": "lp"}, preds)
    with pytest.raises(StoreError, match="already recorded"):
        store.write_run({"run_id": "r", "model": "m", "method": "lp"}, preds)
    assert store.count("predictions") == 1 and store.count("runs") == 1
    assert schemas.PREDICTIONS.names  # the table was written through the store's schema


def test_two_sweeps_at_once_both_commit_whole_and_the_same_sweep_twice_stores_once(tmp_path):
    store_dir = _vector_store(tmp_path / "s")
    base = [sys.executable, "-m", "embedkit.cli", "--store", str(store_dir)]
    other = [*SWEEP[:SWEEP.index("--grid") + 1], "lr=1e-4,3e-3", *SWEEP[SWEEP.index("--grid") + 2:]]
    for second, runs in ((other, 8), (SWEEP, 8)):  # a different grid adds 4 runs; the same one again adds none
        procs = [subprocess.Popen([*base, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for args in (SWEEP, second)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
        assert assert_consistent(store_dir, tmp_path) == runs


def test_a_repeated_run_reports_the_stored_one(tmp_path):
    store_dir = _vector_store(tmp_path / "s")
    first, again = _cli(store_dir, PROBE), _cli(store_dir, [*PROBE[:-1]])
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    assert json.loads(first.stdout)["run_id"] in again.stdout and "already recorded" in again.stdout
    assert Store(store_dir).count("runs") == 1


def test_doctor_finds_and_repairs_orphans_duplicates_and_stale_copies(tmp_path):
    import pyarrow as pa

    from embedkit.store import schemas
    from embedkit.store.store import embeddings_table

    store_dir = _vector_store(tmp_path / "s")
    store = Store(store_dir)
    assert _cli(store_dir, PROBE, "kill:3").returncode == -9  # orphan predictions, journal left behind
    table = embeddings_table(MODEL)
    twice = store.read(table).slice(0, 5)
    store.append(table, twice, schemas.embeddings_schema(32))  # a second pass of 5 rows (no lock, older code)
    old = twice.append_column("split", pa.array(["test"] * 5))  # an older-layout table with a stale copy
    store.db.create_table("emb_old", old)
    runner = CliRunner()
    found = runner.invoke(app, ["--store", str(store_dir), "doctor", "--json"])
    assert found.exit_code == 1
    kinds = {(f["kind"], f["table"]): f["rows"] for f in json.loads(found.output)}
    assert kinds[("orphan_predictions", "predictions")] == ROWS
    assert kinds[("duplicate_vectors", table)] == 5
    assert kinds[("stale_copies", "emb_old")] == sum(r["split"] != "test" for r in store.read(
        "images", f"row_id IN ({', '.join(repr(r) for r in twice['row_id'].to_pylist())})").to_pylist())
    repaired = runner.invoke(app, ["--store", str(store_dir), "doctor", "--repair"])
    assert repaired.exit_code == 0 and repaired.output.count("(repaired)") == 3, repaired.output
    assert store.count("predictions") == 0 and store.count(table) == ROWS and not store.pending_runs()
    assert "split" not in store.open("emb_old").schema.names
    clean = runner.invoke(app, ["--store", str(store_dir), "doctor"])
    assert clean.exit_code == 0 and "no orphans" in clean.output
    assert _cli(store_dir, PROBE).returncode == 0  # the repaired slice trains again


def _cohort_store(tmp_path: Path, name: str) -> Path:
    from conftest import write_cohort_images

    folder = tmp_path / "images"
    if not folder.is_dir():
        write_cohort_images(folder, n_per_class=4)
    frame = write_cohort_images(tmp_path / "scratch", n_per_class=4)  # the same rows (same seed), for the manifest
    manifest = tmp_path / "m.csv"
    frame.to_csv(manifest, index=False)
    store_dir = tmp_path / name
    result = CliRunner().invoke(app, ["--store", str(store_dir), "data", "import", str(manifest), "--images",
                                      str(folder), "--cohort", "c"])
    assert result.exit_code == 0, result.output
    return store_dir


EMBED = ["embed", "--model", "tiny-clip", "--random-init", "--cohort", "c", "--workers", "0", "--batch-size", "4",
         "--chunk-images", "8", "--quiet"]


def _embedded(store_dir: Path) -> dict:
    store = Store(store_dir)
    rows = store.read("emb_tiny_clip").to_pandas() if store.has("emb_tiny_clip") else None
    return {"rows": rows, "prompts": store.count("prompts_tiny_clip")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kill", "enospc"])
def test_embed_faults_at_every_write_never_duplicate_and_a_rerun_completes(tmp_path, kind):
    reference = _cohort_store(tmp_path, "reference")
    assert _cli(reference, EMBED).returncode == 0
    expected = _embedded(reference)
    n = len(expected["rows"])
    expected_vectors = expected["rows"].set_index("row_id")["vector"]
    point = 0
    while True:
        point += 1
        store_dir = _cohort_store(tmp_path, f"{kind}-{point}")
        faulted = _cli(store_dir, EMBED, f"{kind}:{point}")
        if faulted.returncode == 0:
            break
        assert faulted.returncode == (-9 if kind == "kill" else 1), faulted.stderr
        if kind == "enospc":
            assert faulted.stderr.startswith("error: No space left on device"), faulted.stderr
        partial = _embedded(store_dir)["rows"]
        assert partial is None or (partial["row_id"].is_unique and len(partial) <= n)
        rerun = _in_process(store_dir, EMBED, "")  # only the faulted run needs a process of its own
        assert rerun.returncode == 0, rerun.stderr
        done = _embedded(store_dir)
        assert len(done["rows"]) == n and done["rows"]["row_id"].is_unique
        assert done["prompts"] == expected["prompts"]
        got = done["rows"].set_index("row_id")["vector"]
        for row_id, vector in expected_vectors.items():
            np.testing.assert_array_equal(got[row_id], vector)
    assert point > 6  # weights, prompts and three chunks: every gap between them was visited


def test_a_probe_racing_an_unfinished_embedding_pass_is_refused(tmp_path):
    store_dir = _cohort_store(tmp_path, "s")
    # points 1-10: the settings and weights rows, the two prompt sets (clip, biomedclip-authors); 11-12 the first
    # chunk: the pass dies right after it
    assert _cli(store_dir, EMBED, "kill:12").returncode == -9
    rows = _embedded(store_dir)["rows"]
    assert 0 < len(rows) < 24
    probe = _cli(store_dir, ["probe", "--model", "tiny-clip", "--epochs", "1", "--hidden", "8"])
    assert probe.returncode == 1 and probe.stderr.startswith("error: ") and "Traceback" not in probe.stderr
    assert f"{24 - len(rows)} of 24 rows" in probe.stderr and "--allow-partial" in probe.stderr
    assert not Store(store_dir).has("runs") or Store(store_dir).count("runs") == 0


def test_two_embedding_passes_at_once_write_every_row_once(tmp_path):
    """Started together: one pass embeds, the other is refused with one line naming the holder, or (when it starts
    after the first has finished) finds every row there. Never a row twice."""
    store_dir = _cohort_store(tmp_path, "s")
    base = [sys.executable, "-m", "embedkit.cli", "--store", str(store_dir)]
    procs = [subprocess.Popen([*base, *EMBED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    for p, (out, err) in zip(procs, outs):
        if p.returncode:
            assert err.startswith("error: pid ") and "holds" in err and "Traceback" not in err, err
        else:
            assert "24 rows, 0 already there" in out or "0 rows, 24 already there" in out, out
    assert codes in ([0, 0], [0, 1])
    rows = _embedded(store_dir)["rows"]
    assert len(rows) == 24 and rows["row_id"].is_unique


@pytest.mark.slow
def test_a_real_full_disk_gives_one_line_and_records_nothing_half(tmp_path):
    """The store on a 8 MiB tmpfs filled to the brim: probe fails with one line, the store stays consistent, and
    once space is freed the same command completes (skipped where this process may not mount a tmpfs)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        store_dir = _vector_store(mount / "s")
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        filler = mount / "filler"
        filler.write_bytes(b"\0" * max(free - 40 * 1024, 0))
        full = _cli(store_dir, PROBE)
        assert full.returncode == 1 and full.stderr.startswith("error: No space left on device"), full.stderr
        assert "Traceback" not in full.stderr and len(full.stderr.strip().splitlines()) == 1
        assert assert_consistent(store_dir, tmp_path) == 0
        filler.unlink()
        assert _cli(store_dir, PROBE).returncode == 0
        assert assert_consistent(store_dir, tmp_path) == 1
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.parametrize("point", [17, 30])
def test_a_killed_two_model_pass_resumes_with_every_row_once(tmp_path, point):
    """Killed among its writes (points 1-10 set up tiny-clip, 11-20 tiny-gloria, then the chunks of both: 17 is
    amid tiny-gloria's prompts, 30 amid the chunks), the rerun of the same two-model command leaves each table with every row exactly once."""
    store_dir = _cohort_store(tmp_path, "s")
    args = ["embed", "--model", "tiny-clip,tiny-gloria", *EMBED[3:]]
    assert _cli(store_dir, args, f"kill:{point}").returncode == -9
    rerun = _in_process(store_dir, args, "")
    assert rerun.returncode == 0, rerun.stderr
    store = Store(store_dir)
    for table in ("emb_tiny_clip", "emb_tiny_gloria"):
        rows = store.read(table).to_pandas()
        assert len(rows) == 24 and rows["row_id"].is_unique, table
    local = store.read("localsim_tiny_gloria").to_pandas()
    assert not local.duplicated(["row_id", "weights_id", "prompt_set"]).any()
    assert set(local["row_id"]) == set(store.read("emb_tiny_gloria").to_pandas()["row_id"])
