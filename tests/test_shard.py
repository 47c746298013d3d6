"""The sharded embedding pass: N processes write uncommitted Lance fragments, one commit joins them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.shard import Shard, ShardError, staging_dir
from embedkit.store.store import Store

ROOT = Path(__file__).resolve().parents[1]


def _store_with_cohort(tmp_path, name: str, frame, folder) -> Path:
    manifest = tmp_path / "m.csv"
    frame.to_csv(manifest, index=False)
    store_dir = tmp_path / name
    result = CliRunner().invoke(app, ["--store", str(store_dir), "data", "import", str(manifest), "--images",
                                      str(folder), "--cohort", "c"])
    assert result.exit_code == 0, result.output
    return store_dir


def _embed_cmd(store_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embedkit.cli", "--store", str(store_dir), "embed", "--model", "tiny-clip",
            "--random-init", "--cohort", "c", "--workers", "0", "--batch-size", "4", "--chunk-images", "4",
            "--quiet", *extra]


def _env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("EMBEDKIT_FAULT", None)
    env.update(extra)
    return env


def _vectors(store_dir: Path) -> dict:
    table = Store(store_dir).read("emb_tiny_clip").to_pandas()
    assert table["row_id"].is_unique
    return {r: np.asarray(v) for r, v in zip(table["row_id"], table["vector"])}


def test_shard_spec_is_checked():
    assert Shard.parse("2/4") == Shard(2, 4)
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ShardError, match="I/N"):
            Shard.parse(bad)


@pytest.mark.slow
def test_four_shard_processes_committed_once_equal_the_one_process_pass(tmp_path, small_cohort):
    frame, folder = small_cohort
    one = _store_with_cohort(tmp_path, "one", frame, folder)
    sharded = _store_with_cohort(tmp_path, "sharded", frame, folder)
    done = subprocess.run(_embed_cmd(one), capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr

    # shard 1 is killed after its first chunk's fragments are saved (fault point 3: before its second chunk's
    # fragments are written); the others run side by side as four separate processes would on four machines
    killed = subprocess.run(_embed_cmd(sharded, "--shard", "1/4"), capture_output=True, text=True,
                            env=_env(EMBEDKIT_FAULT="kill:3"), timeout=300)
    assert killed.returncode == -9
    procs = [subprocess.Popen(_embed_cmd(sharded, "--shard", f"{i}/4"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for i in (0, 2, 3)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert Store(sharded).count("emb_tiny_clip") == 0  # written, not committed: no reader sees them

    early = subprocess.run(_embed_cmd(sharded, "--commit-shards", "4"), capture_output=True, text=True, env=_env(),
                           timeout=300)
    assert early.returncode == 1 and "shard-1-of-4" in early.stderr and "have not finished" in early.stderr

    resumed = subprocess.run(_embed_cmd(sharded, "--shard", "1/4"), capture_output=True, text=True, env=_env(),
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "4 already there" in resumed.stdout  # the chunk saved before the kill is not embedded again
    folder_1 = staging_dir(Store(sharded), "tiny-clip", "random-init:tiny-clip:0", "c") / "shard-1-of-4"
    assert len(list(folder_1.glob("chunk-*.json"))) == -(-len(frame) // 16)  # a quarter of the images, chunks of 4

    before = Store(sharded).db.open_table("emb_tiny_clip").version
    commit = subprocess.run(_embed_cmd(sharded, "--commit-shards", "4"), capture_output=True, text=True,
                            env=_env(), timeout=300)
    assert commit.returncode == 0, commit.stderr
    assert f"({len(frame)} rows" in commit.stdout
    assert Store(sharded).db.open_table("emb_tiny_clip").version == before + 1  # one commit for all shards
    assert not folder_1.parent.exists()

    a, b = _vectors(one), _vectors(sharded)
    assert sorted(a) == sorted(b) and len(a) == len(frame)
    for row_id, vector in a.items():
        np.testing.assert_allclose(b[row_id], vector, atol=1e-5)
    for table in ("prompts_tiny_clip", "weights", "embedding_settings"):
        assert Store(sharded).count(table) == Store(one).count(table)

    again = subprocess.run(_embed_cmd(sharded, "--commit-shards", "4"), capture_output=True, text=True,
                           env=_env(), timeout=300)
    assert again.returncode == 1 and "have not finished" in again.stderr  # nothing staged: nothing to commit
    assert len(_vectors(sharded)) == len(frame)
