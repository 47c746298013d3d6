"""The embedding pass split across workers: ``embed --shard I/N`` on any scheduler, then ``embed --commit-shards N``.

Lance's distributed-write protocol: each shard writes Lance data files into the model's embeddings table
(``lance.fragment.write_fragments``) without committing them, so readers never see them; the commit step joins
every shard's fragments in one ``LanceOperation.Append`` commit, the only moment the rows appear. Nothing is
home-made about the data path; what embedkit adds is the bookkeeping around it:

- shard I of N owns every N-th distinct image of the cohort (cohort order), so N workers cover the cohort once
  whatever order they run in, on whatever machines share the store;
- after each chunk a shard saves that chunk's fragment metadata (``_shards/<slice>/shard-I-of-N/chunk-K.json``,
  written whole by rename): a killed shard, run again, skips the rows of its saved chunks (resumable by fragment;
  the data files of a chunk killed before its metadata was saved are never referenced, and ``lance`` cleanup
  removes them);
- ``done.json`` marks a finished shard with the settings it used; the commit refuses until all N are done, and
  refuses shards computed under other settings than its own;
- the commit holds the slice's embedding lock, records the settings, weights and prompts as a one-process pass
  does, and appends the fragments once. Run again after a kill between the commit and the removal of
  ``_shards/<slice>`` it finds the rows in the table and only tidies up: a pass committed twice leaves one copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from embedkit.data.cohort import CohortError, cohort_classes, load_cohort
from embedkit.device import resolve_device
from embedkit.embed import (EmbeddingSettings, EmbedSettingsError, EmbedSummary, ToEmbed, _embed_paths, _ModelPass,
                            _prepare, _refuse_other_settings, check_amp)
from embedkit.errors import EmbedkitError
from embedkit.store.store import Store, _fault_point, embeddings_table, sql_eq

SHARDS_DIR = "_shards"


class ShardError(EmbedkitError):
    """A shard spec that is not I/N, or a commit of shards that are missing or disagree."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``I/N`` with 0 <= I < N (``--shard 2/4``: the third of four shards)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
            raise ShardError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), not '{text}'")
        return cls(int(match[1]), int(match[2]))

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


def staging_dir(store: Store, model: str, weights_id: str, cohort: str) -> Path:
    """Where the shards of one embedding slice (model, weights_id, cohort) keep their uncommitted fragments."""
    key = hashlib.sha256(f"{weights_id}\0{cohort}".encode()).hexdigest()[:16]
    store.require_local("a sharded embedding pass (its staged fragments and manifests are local files)")
    return store.path / SHARDS_DIR / f"{embeddings_table(model)}-{key}"


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a reader sees the whole file or none


class _FragmentWriter:
    """Where a shard's chunks go instead of the store: each chunk becomes uncommitted Lance fragments plus one
    metadata file naming them and their rows (the ``append`` the embedding loop calls for a chunk)."""

    def __init__(self, store: Store, folder: Path, first_chunk: int):
        self.store, self.folder, self.next_chunk = store, folder, first_chunk
        self.rows = 0

    def append(self, name: str, data: pa.Table, schema: pa.Schema) -> None:
        from lance.fragment import write_fragments

        data = data.select(schema.names).cast(schema)
        _fault_point()
        fragments = write_fragments(data, str(self.store.path / f"{name}.lance"), schema=schema)
        _fault_point()
        _write_json(self.folder / f"chunk-{self.next_chunk:06d}.json",
                    {"fragments": [f.to_json() for f in fragments], "row_ids": data["row_id"].to_pylist()})
        self.next_chunk += 1
        self.rows += data.num_rows

    def upsert(self, name: str, *_args) -> None:  # per-image extras: refused before the pass (embed_shard)
        raise ShardError(f"a sharded pass writes embeddings only, not table '{name}'")


def _chunks(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("chunk-*.json"))] if folder.is_dir() else []


def _refuse_extras(m: ToEmbed) -> None:
    if m.spec.family.uses_local_similarity:
        raise ShardError(f"{m.spec.name} stores per-image local similarities, which a sharded pass does not write: "
                         "embed it in one pass (drop --shard)")


def embed_shard(store: Store, m: ToEmbed, cohort: str, shard: Shard, device: str = "auto", batch_size: int = 64,
                workers: int = 2, chunk_images: int = 256, progress: bool | Callable[[int, int], None] = True,
                amp: str = "none") -> EmbedSummary:
    """Embed shard ``shard`` of the cohort's images not yet in the table into uncommitted fragments.

    Writes nothing any reader sees; ``commit_shards`` makes the rows of all shards appear at once.
    """
    import time

    _refuse_extras(m)
    spec, weights_id = m.spec, m.weights_id
    folder = staging_dir(store, spec.name, weights_id, cohort) / shard.name
    key = folder.parent.name
    with store.lock(f"{key}-{shard.name}", holder=f"{shard.name} of {spec.name} on cohort '{cohort}'"):
        dev = resolve_device(device)
        check_amp(amp, dev)
        rows = load_cohort(store, cohort)
        one = _ModelPass.on_device(m, dev, amp)
        table, settings = one.table, one.settings
        with store.lock(f"create-{table}", wait_s=60, holder=f"creating table {table}"):
            store.ensure_table(table, one.schema)  # fragments are written into an existing table's folder
        where = f"{sql_eq('weights_id', weights_id)} AND {sql_eq('cohort', cohort)}"
        done = set(store.read(table, where, ["row_id"])["row_id"].to_pylist())
        if done:
            _refuse_other_settings(store, spec.name, weights_id, cohort, settings, len(done))
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / "done.json"
        saved = _chunks(folder)
        staged = {r for chunk in saved for r in chunk["row_ids"]}
        mine = set(list(dict.fromkeys(rows["path"]))[shard.index::shard.count])
        one.todo = rows[rows["path"].isin(mine) & ~rows["row_id"].isin(done | staged)]
        one.skipped = len(done) + len(staged)
        one.paths = list(dict.fromkeys(one.todo["path"]))
        writer = _FragmentWriter(store, folder, len(saved))
        start = time.perf_counter()
        if one.paths:
            marker.unlink(missing_ok=True)
            _embed_paths(writer, [one], one.paths, dev, batch_size, workers, chunk_images, progress, amp)
        _write_json(marker, {"shard": shard.name, "weights_id": weights_id, "amp": settings.amp,
                             "preprocess": settings.preprocess})
        return EmbedSummary(spec.name, weights_id, cohort, len(one.paths), writer.rows, one.skipped,
                            time.perf_counter() - start, f"{table} (uncommitted: {shard.name})")


def commit_shards(store: Store, m: ToEmbed, cohort: str, count: int, device: str = "auto",
                  extra_prompt_sets: list[str] | None = None, amp: str = "none") -> EmbedSummary:
    """Commit the fragments of shards 0..count-1 of (model, weights_id, cohort) in one Lance commit, with the
    settings, weights and prompts a one-process pass records. Refuses while a shard is unfinished."""
    import time

    import lance

    _refuse_extras(m)
    spec, weights_id = m.spec, m.weights_id
    root = staging_dir(store, spec.name, weights_id, cohort)
    start = time.perf_counter()
    with store.embedding_lock(spec.name, weights_id, cohort):
        shards = [Shard(i, count) for i in range(count)]
        unfinished = [s.name for s in shards if not (root / s.name / "done.json").is_file()]
        if unfinished:
            raise ShardError(f"{len(unfinished)} of {count} shards of {spec.name} on cohort '{cohort}' have not "
                             f"finished ({', '.join(unfinished)}): run `embed --shard I/{count}` for each (a killed "
                             "shard resumes), then commit again (nothing was committed)")
        others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in {s.name for s in shards})
        if others:
            raise ShardError(f"{root} also holds {', '.join(others)}, shards of another split: commit with their "
                             "N, or delete that folder (nothing was committed)")
        dev = resolve_device(device)
        check_amp(amp, dev)
        settings = EmbeddingSettings(amp, m.preprocess or m.model.default_preprocessing())
        for s in shards:
            made = json.loads((root / s.name / "done.json").read_text())
            if (made["amp"], made["preprocess"]) != (settings.amp, settings.preprocess):
                raise ShardError(f"{s.name} was computed with amp {made['amp']}, preprocess {made['preprocess']}; "
                                 f"this commit asks for {settings.describe()} (nothing was committed)")
        rows = load_cohort(store, cohort)
        classes = cohort_classes(rows)
        if not classes:
            raise CohortError(f"cohort '{cohort}' has no single-label rows: no classes to embed prompts for")
        _prepare(store, m, rows, classes, cohort, dev, False, extra_prompt_sets or [], amp)
        chunks = [c for s in shards for c in _chunks(root / s.name)]
        row_ids = [r for c in chunks for r in c["row_ids"]]
        table = embeddings_table(spec.name)
        where = f"{sql_eq('weights_id', weights_id)} AND {sql_eq('cohort', cohort)}"
        present = len(set(store.read(table, where, ["row_id"])["row_id"].to_pylist()) & set(row_ids))
        if present and present < len(row_ids):
            raise ShardError(f"{present} of the {len(row_ids)} rows the shards embedded are already in {table} "
                             "(another pass wrote them since): delete the shards' folder "
                             f"{root} and run the shards again (nothing was committed)")
        if row_ids and not present:  # present == len: committed before a kill, only the tidying is left
            from lance.fragment import FragmentMetadata

            fragments = [FragmentMetadata.from_json(json.dumps(f)) for c in chunks for f in c["fragments"]]
            uri = str(store.path / f"{table}.lance")
            with store._writing(table):
                _fault_point()
                read_version = lance.dataset(uri).version
                lance.LanceDataset.commit(uri, lance.LanceOperation.Append(fragments), read_version=read_version)
                _fault_point()
        shutil.rmtree(root)
        return EmbedSummary(spec.name, weights_id, cohort, 0, 0 if present else len(row_ids), present,
                            time.perf_counter() - start, table)
