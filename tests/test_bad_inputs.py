"""Bad input gets one `error:` line naming the file and the reason, and writes nothing (a start on issue 14's corpus)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "header-only.csv": ("image_id,label,age,sex\n", [], "has a header but no rows"),
    "repeated-column.csv": ("image_id,label,age,sex,sex\na.png,Effusion,40,M,F\n", [],
                            "appear more than once in the header"),
    "map-clash.csv": ("image_id,label,age,Sex,sex\na.png,Effusion,40,M,F\n", ["--map", "Sex=sex"],
                      "--map would give two columns the name"),
}


def _embedkit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_manifest_is_one_line_naming_the_file(tmp_path, name):
    text, extra, reason = CASES[name]
    manifest = tmp_path / name
    manifest.write_text(text)
    store = tmp_path / "store"
    result = _embedkit("--store", str(store), "data", "import", str(manifest), "--images", str(tmp_path),
                       "--cohort", "c", "--no-verify", *extra)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {manifest}: ") and reason in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not store.exists()  # nothing written


def test_a_store_path_that_is_a_file_is_refused(tmp_path):
    import os

    target = tmp_path / "not-a-folder"
    target.write_text("x")
    for args in (["runs"], ["doctor"], ["sql", "SELECT 1"]):
        result = _embedkit(*args, env={**os.environ, "EMBEDKIT_STORE": str(target)})
        assert result.returncode == 1 and "is a file, not a folder" in result.stderr, (args, result.stderr)
    assert target.read_text() == "x"
