"""The store on object storage: `--store s3://bucket/prefix` against moto's S3 server on 127.0.0.1.

Import, embed (tiny random-init model), probe, fairness, sql and export through the CLI, every table on the server
and nothing in the local folder; a probe killed between its two commits (EMBEDKIT_FAULT, as in
tests/test_store_faults.py) leaves the store readable with the orphans invisible, and the next commit takes over the
dead writer's lease at once and removes them; locks are leases (conditional puts), exclusive while held.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import main_cli, write_cohort_images
from embedkit.store.store import FAULT_ENV, Store, StoreBusy

pytestmark = pytest.mark.slow
BUCKET = "embedkit-test"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port, a bucket, and the AWS environment pointing at it."""
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield boto3.client("s3")
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _cli(monkeypatch, capsys, uri: str, *args: str) -> str:
    code, out, err = main_cli(monkeypatch, capsys, "--store", uri, *args)
    assert code == 0, err
    return out


def _subprocess(uri: str, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "embedkit.cli", "--store", uri, *args], capture_output=True,
                          text=True, timeout=300, env=env)


PROBE = ["probe", "--model", "tiny-clip", "--cohort", "c", "--head", "lp", "--epochs", "2", "--hidden", "16",
         "--threads", "1", "--json"]


def test_embed_probe_fairness_export_on_s3_and_a_kill_mid_commit(s3, tmp_path, monkeypatch, capsys):
    uri = f"s3://{BUCKET}/stores/one"
    folder = tmp_path / "images"
    write_cohort_images(folder, n_per_class=4, size=32).to_csv(tmp_path / "cohort.csv", index=False)
    monkeypatch.chdir(tmp_path)
    _cli(monkeypatch, capsys, uri, "data", "import", str(tmp_path / "cohort.csv"), "--images", str(folder),
         "--cohort", "c")
    _cli(monkeypatch, capsys, uri, "embed", "--model", "tiny-clip", "--cohort", "c", "--random-init",
         "--workers", "0", "--quiet")
    first = json.loads(_cli(monkeypatch, capsys, uri, *PROBE, "--seed", "1"))
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="stores/one/")["Contents"]}
    tables = {k.split("/")[2] for k in keys if ".lance/" in k}
    assert {"images.lance", "emb_tiny_clip.lance", "prompts_tiny_clip.lance", "runs.lance",
            "predictions.lance"} <= tables
    assert not any("_locks/" in k or "_journal/" in k for k in keys)  # leases released, journal cleared
    assert not list(tmp_path.glob("s3*")) and not (tmp_path / "embedkit-store").exists()  # nothing local

    fairness = json.loads(_cli(monkeypatch, capsys, uri, "fairness", "--run", first["run_id"], "--ci", "0", "--json"))
    assert [r["run_id"] for r in fairness["runs"]] == [first["run_id"]] and fairness["runs"][0]["n"] == 6
    assert fairness["rows"] and {row["run_id"] for row in fairness["rows"]} == {first["run_id"]}
    out = _cli(monkeypatch, capsys, uri, "sql", "--format", "csv", "SELECT count(*) AS n FROM predictions")
    assert out.splitlines()[-1] == "24"
    _cli(monkeypatch, capsys, uri, "export", "--parquet", str(tmp_path / "export"))
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "export" / "tables" / "predictions.parquet").num_rows == 24

    # Killed between the predictions append and the runs row: readable, the orphans invisible, the journal names
    # the run; the next commit takes the dead writer's lease at once and removes them.
    killed = _subprocess(uri, [*PROBE, "--seed", "2"], fault="kill:3")
    assert killed.returncode == -9, killed.stderr
    store = Store(uri)
    assert store.count("predictions") == 48 and store.count("runs") == 1 and store.pending_runs()
    out = _cli(monkeypatch, capsys, uri, "sql", "--format", "csv", "SELECT count(*) AS n FROM predictions")
    assert out.splitlines()[-1] == "24"
    again = _subprocess(uri, [*PROBE, "--seed", "2"])
    assert again.returncode == 0, again.stderr
    store = Store(uri)
    assert store.count("predictions") == 48 and store.count("runs") == 2 and not store.pending_runs()


def test_a_lease_is_exclusive_while_held_and_a_dead_holders_lease_is_taken_over(s3):
    store = Store(f"s3://{BUCKET}/stores/leases")
    with store.lock("runs", holder="first"):
        with pytest.raises(StoreBusy, match=r"pid \d+ on .* \(first, since .*holds the lease"):
            with store.lock("runs", wait_s=0.3, holder="second"):
                pass
    with store.lock("runs", holder="again"):  # released: free at once
        pass
    # A lease left by a process of this host that is gone (a pid that cannot be running) is taken over at once.
    dead = json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "holder": "killed", "since": "-",
                       "expires": 4e9}).encode()
    s3.put_object(Bucket=BUCKET, Key="stores/leases/_locks/runs.lock", Body=dead)
    with store.lock("runs", wait_s=0.0, holder="after a kill"):
        pass


def test_commands_that_need_local_files_say_so(s3, monkeypatch, capsys, tmp_path):
    code, _, err = main_cli(monkeypatch, capsys, "--store", f"s3://{BUCKET}/stores/x", "study", "--models",
                            "tiny-clip", "--cohort", "synthetic", "--random-init", "--plan")
    assert code == 1 and err.startswith("error: a study (its synthetic X-rays") and "on object storage" in err
    code, _, err = main_cli(monkeypatch, capsys, "--store", "s3://no-such-bucket-here/x", "runs")
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err


WRITER = """
import sys
import pyarrow as pa
from embedkit.store.store import Store
store, who = Store(sys.argv[1]), sys.argv[2]
for i in range(4):
    run_id = f"{who}-{i}"
    preds = pa.table({"run_id": [run_id] * 3, "row_id": ["a", "b", "c"], "image_id": ["a", "b", "c"],
                      "split": ["test"] * 3, "y_true": [0, 1, 0], "y_pred": [0, 1, 1],
                      "probs": [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]]})
    store.write_run({"run_id": run_id, "model": "m", "method": "lp"}, preds)
"""


def test_run_commits_of_concurrent_processes_take_turns_on_the_lease(s3):
    uri = f"s3://{BUCKET}/stores/concurrent"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, who], env=env, stderr=subprocess.PIPE, text=True)
             for who in ("p", "q", "r")]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.stderr.read()
    store = Store(uri)
    runs = sorted(store.read("runs", columns=["run_id"])["run_id"].to_pylist())
    assert runs == sorted(f"{w}-{i}" for w in "pqr" for i in range(4))
    per_run = {}
    for row in store.read("predictions", columns=["run_id"]).to_pylist():
        per_run[row["run_id"]] = per_run.get(row["run_id"], 0) + 1
    assert per_run == {r: 3 for r in runs} and not store.pending_runs()
