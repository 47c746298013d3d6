"""Hostile-input cases: broken, missing or misplaced stores, SQL the store cannot answer, and the "this is a bug"
path (see tests/hostile.py)."""

from __future__ import annotations

from pathlib import Path

from hostile import Case, small_manifest

# Every verb that opens a store, with arguments that would get it past its own option checks.
_IMPORT = ("data", "import", "{tmp}/cohort/manifest.csv", "--images", "{tmp}/cohort/images", "--cohort", "c")
_READERS = {
    "runs": ("runs",),
    "runs-delete": ("runs", "delete", "zeroshot-x"),
    "data-info": ("data", "info"),
    "fairness": ("fairness", "--ci", "0"),
    "sql": ("sql", "SELECT 1"),
    "doctor": ("doctor",),
    "export": ("export", "--parquet", "{tmp}/out"),
    "report": ("report", "--out", "{tmp}/report", "--ci", "0"),
    "zeroshot": ("zeroshot", "--model", "tiny-clip"),
    "probe": ("probe", "--model", "tiny-clip", "--epochs", "1"),
    "sweep": ("sweep", "--model", "tiny-clip", "--seeds", "0", "--epochs", "1", "--quiet"),
    "embed": ("embed", "--model", "tiny-clip", "--random-init", "--cohort", "c", "--device", "cpu", "--quiet"),
    "finetune": ("finetune", "--model", "tiny-clip", "--method", "lora", "--random-init", "--cohort", "c",
                 "--device", "cpu"),
}
_WRITERS = {
    "data-import": _IMPORT,
    "data-synth": ("data", "synth", "--out", "{tmp}/synth", "--size", "16"),
    "data-nih": ("data", "nih", "--no-verify"),
    "study": ("study", "--plan"),
}


def _store_is_a_file(tmp: Path, store: Path) -> None:
    small_manifest(tmp / "cohort", n_per_class=1)
    store.write_text("x")


def _empty_folder(tmp: Path, store: Path) -> None:
    store.mkdir()


def _delete_data_file(table: str):
    def setup(tmp: Path, store: Path) -> None:
        for path in (store / f"{table}.lance" / "data").glob("*.lance"):
            path.unlink()

    return setup


_NO_STORE = "(the folder does not exist): create one with `embedkit data import"
_MISSING = "is missing its data file data/"

CASES = [
    # a store path that is a file: every verb says so
    *[Case(f"store-is-a-file-{name}", args, "is a file, not a folder", names="{store}", setup=_store_is_a_file)
      for name, args in {**_READERS, **_WRITERS}.items()],
    # a store that does not exist: every reader says so (and creates nothing), instead of answering "empty"
    *[Case(f"store-missing-{name}", args, _NO_STORE, names="no store at {store}") for name, args in _READERS.items()],
    Case("store-empty-folder-runs", ("runs",), "(the folder holds no tables): create one with", names="{store}",
         setup=_empty_folder),
    # a Lance data file deleted by hand: one line naming the table and file, pointing at doctor
    Case("store-missing-data-file-fairness", ("fairness", "--ci", "0", "--split", "train"), _MISSING,
         names="table 'predictions' in the store {store}", store="embedded", setup=_delete_data_file("predictions")),
    Case("store-missing-data-file-sql", ("sql", "SELECT count(*) FROM predictions"), _MISSING,
         names="table 'predictions' in the store {store}", store="embedded", setup=_delete_data_file("predictions")),
    Case("store-missing-data-file-runs", ("runs",), "table 'runs' in the store",
         names="`embedkit --store {store} doctor` lists the damaged tables", store="embedded",
         setup=_delete_data_file("runs")),
    Case("store-missing-data-file-data-info", ("data", "info"), _MISSING, names="table 'images'", store="embedded",
         setup=_delete_data_file("images")),
    Case("store-missing-data-file-zeroshot", ("zeroshot", "--model", "tiny-clip", "--logit-scale", "5"), _MISSING,
         names="table 'emb_tiny_clip'", store="embedded", setup=_delete_data_file("emb_tiny_clip")),
    # the operating system refusing a write (injected: the tests may run as root, whom a chmod does not stop)
    Case("store-read-only-drop-table", ("doctor", "--drop-table", "emb_tiny_clip"),
         "Read-only file system while writing table 'emb_tiny_clip'", names="{store}", store="embedded",
         env={"EMBEDKIT_FAULT": "erofs:1"}),
    Case("store-read-only-import", _IMPORT, "Read-only file system while writing table", names="{store}",
         store="cohort", setup=lambda tmp, store: small_manifest(tmp / "cohort"), env={"EMBEDKIT_FAULT": "erofs:1"}),
    Case("store-disk-full-import", _IMPORT, "No space left on device while writing table", names="{store}",
         store="cohort", setup=lambda tmp, store: small_manifest(tmp / "cohort"), env={"EMBEDKIT_FAULT": "enospc:1"}),
    # SQL the store cannot answer: user input, one line
    Case("sql-conversion-error", ("sql", "SELECT 'abc'::INTEGER"), "Could not convert string 'abc' to INT32",
         store="embedded"),
    Case("sql-unknown-table", ("sql", "SELECT * FROM no_such_table"), "Table with name no_such_table does not exist",
         store="embedded"),
    Case("sql-syntax-error", ("sql", "SELEC 1"), 'syntax error at or near "SELEC"', store="embedded"),
    # an exception no code expects: "this is a bug", the traceback in the store's _logs (not store content)
    Case("internal-error-is-a-bug-with-a-log", ("doctor", "--drop-table", "emb_tiny_clip"),
         "internal error: RuntimeError: injected bug at fault point 1 — this is a bug; please report it at",
         names="{store}/_logs/", store="embedded", env={"EMBEDKIT_FAULT": "bug:1"}),
]
