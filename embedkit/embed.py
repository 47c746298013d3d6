"""The embedding pass: a cohort's images and the class prompts become vectors in the store.

One pass serves one model or several (``embed --model a,b,c`` / ``all``): each image is decoded once, in
DataLoader workers, and given to every model still lacking it through that model's own preprocessing
(``--preprocess``), so each model sees exactly the tensor a one-model pass feeds it; a model whose
pixels the pixel cache holds (``embedkit data cache``, embedkit/data/pixels.py) reads them instead of a decode. The models run under inference
mode in fp32, as every upstream path does (``--amp bf16|fp16``: autocast on CUDA, asked for); each model's vectors
are appended to its own table in chunks keyed by (row_id, weights_id), each chunk one atomic commit. A killed run
therefore leaves whole chunks only, and the next run embeds just the rows still missing. Rows that repeat an image
(the paper cohort) share one forward pass. The pass's settings (autocast, preprocessing) are recorded per (model,
weights_id, cohort) in ``embedding_settings``; a pass whose settings differ from those of the rows already stored
is refused, so vectors computed two ways never mix. One pass per (model, weights, cohort) at a time (a lock):
two concurrent passes over the same rows would both append.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from embedkit.constants import AMP_MODES
from embedkit.data import pixels
from embedkit.data.cohort import CohortError, cohort_classes, cohort_labels, cohort_task, load_cohort
from embedkit.data.images import ImageDecodeError, decode_image
from embedkit.device import autocast_context, resolve_device
from embedkit.errors import EmbedkitError
from embedkit.models.registry import ModelSpec
from embedkit.store import schemas
from embedkit.store.store import Store, embeddings_table, prompts_table, sql_eq


def localsim_table(model: str) -> str:
    return "localsim_" + model.replace("-", "_")


SETTINGS_TABLE = "embedding_settings"
# What a store's vectors without a settings record were computed with: embedkit then autocast the image pass to
# bf16 on a GPU and ran fp32 on a CPU (which of the two is not known), and each family's legacy preprocessing.
LEGACY_AMP = "auto"


class EmbedSettingsError(EmbedkitError):
    """An embedding pass's settings are not possible here, or differ from those of the vectors already stored."""


@dataclass(frozen=True)
class EmbeddingSettings:
    """How the image vectors of one (model, weights_id, cohort) were computed.

    ``amp``: ``none`` (fp32, the default), ``bf16`` or ``fp16`` (autocast on CUDA), or ``auto`` for vectors
    stored before passes recorded it (bf16 on a GPU, fp32 on a CPU); ``preprocess``: the family's preprocessing
    (``ModelFamily.legacy_preprocessing`` for those old vectors). Prompt vectors are always computed in fp32.
    """

    amp: str
    preprocess: str
    recorded: bool = True  # False: vectors from before passes recorded their settings (the values say what ran)

    def describe(self) -> str:
        """``amp none, preprocess study`` (and, for old vectors, that the values were not recorded)."""
        text = f"amp {self.amp}, preprocess {self.preprocess}"
        if self.recorded:
            return text
        return text + (" (not recorded: the defaults of embedkit before passes recorded them; amp auto = bf16 "
                       "autocast on a GPU, fp32 on a CPU)")

    def config(self) -> dict:
        """What a run's config records of the vectors it used."""
        return {"amp": self.amp, "preprocess": self.preprocess, "recorded": self.recorded}

    def same_as(self, other: "EmbeddingSettings") -> bool:
        return (self.amp, self.preprocess) == (other.amp, other.preprocess)


def _legacy_preprocessing(model: str) -> str:
    from embedkit.models.base import ModelFamily
    from embedkit.models.registry import UnknownModelError, get_spec

    try:
        return get_spec(model).family.legacy_preprocessing
    except UnknownModelError:  # a model this version does not know: the interface's default
        return ModelFamily.legacy_preprocessing


def embedding_settings(store: Store, model: str, weights_id: str, cohort: str) -> EmbeddingSettings:
    """The settings the stored vectors of (model, weights_id, cohort) were computed with.

    A store without a record for them (written before passes recorded settings), or a record with a null column
    (a column added since), reads as the old default: amp ``auto``, the family's ``legacy_preprocessing``.
    """
    row: dict = {}
    if store.has(SETTINGS_TABLE):
        where = f"{sql_eq('model', model)} AND {sql_eq('weights_id', weights_id)} AND {sql_eq('cohort', cohort)}"
        found = store.read(SETTINGS_TABLE, where).to_pylist()
        row = found[0] if found else {}
    amp, preprocess = row.get("amp"), row.get("preprocess")
    return EmbeddingSettings(amp or LEGACY_AMP, preprocess or _legacy_preprocessing(model),
                             recorded=amp is not None and preprocess is not None)


def _record_settings(store: Store, model: str, weights_id: str, cohort: str, settings: EmbeddingSettings) -> None:
    row = {"model": model, "weights_id": weights_id, "cohort": cohort, "amp": settings.amp,
           "preprocess": settings.preprocess, "updated_at": datetime.now(timezone.utc)}
    store.upsert(SETTINGS_TABLE, pa.Table.from_pylist([row], schema=schemas.EMBEDDING_SETTINGS),
                 ["model", "weights_id", "cohort"], schemas.EMBEDDING_SETTINGS)


def check_amp(amp: str, device: torch.device) -> None:
    """Refuse autocast anywhere but CUDA (on a CPU it would silently run something else than asked)."""
    if amp not in AMP_MODES:
        raise EmbedSettingsError(f"--amp must be one of {', '.join(AMP_MODES)}, not '{amp}'")
    if amp != "none" and device.type != "cuda":
        raise EmbedSettingsError(f"--amp {amp} is autocast on CUDA, and this pass runs on {device.type}: drop "
                                 "--amp (the pass is fp32) or run it on a GPU (--device cuda)")


class ImageFiles(torch.utils.data.Dataset):
    """Decoded, preprocessed images by position; a file that fails to decode raises (never a blank image)."""

    def __init__(self, paths: list[str], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return index, self.transform(decode_image(self.paths[index]))


class MultiImageFiles(torch.utils.data.Dataset):
    """Each image decoded once and preprocessed for every model that needs it (``needs[i][m]``): item ``i`` is
    ``(i, [tensor, or None where model m does not need image i])``. Batched by :func:`collate_images`.

    Models with equal preprocessings (``transforms[m] == transforms[k]``: CLIP and BiomedCLIP, MedCLIP's two towers)
    are given the same tensor object, computed once. ``sources[m]``: model m's pixel-cache entry
    (embedkit/data/pixels.py), or None; an image every model that needs it finds in its entry is not decoded at all
    (``transforms[m].tensor`` of the cached pixels: the same tensor).
    """

    def __init__(self, paths: list[str], transforms: list, needs: list[tuple[bool, ...]], sources: list | None = None):
        self.paths, self.transforms, self.needs = paths, transforms, needs
        self.sources = sources or [None] * len(transforms)
        self.first = [transforms.index(t) for t in transforms]  # the first model with an equal preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        image = None
        made: dict[int, torch.Tensor] = {}
        out = []
        for m, (transform, source, need) in enumerate(zip(self.transforms, self.sources, self.needs[index])):
            if not need:
                out.append(None)
                continue
            key = self.first[m]
            if key not in made:
                if source is not None and path in source:
                    made[key] = transform.tensor(source.pixels(path))
                else:
                    image = decode_image(path) if image is None else image
                    made[key] = transform(image)
            out.append(made[key])
        return index, out


def collate_images(items: list) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """A batch of :class:`MultiImageFiles` items: (positions, per model (the batch rows it has, their pixels)).

    Models given the same tensors (equal preprocessings) share one stacked batch, so it crosses from the worker
    once."""
    index = torch.tensor([i for i, _ in items])
    per_model = []
    for m in range(len(items[0][1])):
        chosen = [k for k, (_, tensors) in enumerate(items) if tensors[m] is not None]
        mine = [items[k][1][m] for k in chosen]
        pixels = next((stacked for j, (earlier, stacked) in enumerate(per_model) if stacked is not None
                       and earlier.tolist() == chosen and all(items[k][1][j] is t for k, t in zip(chosen, mine))),
                      None)
        if pixels is None and chosen:
            pixels = torch.stack(mine)
        per_model.append((torch.tensor(chosen, dtype=torch.long), pixels))
    return index, per_model


@dataclass
class EmbedSummary:
    model: str
    weights_id: str
    cohort: str
    images: int  # forward passes run in this call
    rows: int  # rows written in this call
    skipped: int  # rows already embedded with this weights_id
    seconds: float
    table: str
    cached: bool = False  # the pixels came from the pixel cache (embedkit data cache), not from decoding
    group: tuple[int, int] = (1, 1)  # (k, of n): the device group of the pass it ran in (embed.device_groups)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.images} images ({self.rows} rows, {self.skipped} already there) in {self.seconds:.1f} s, "
                f"{self.images_per_second:.1f} images/s{' (pixels from the cache)' if self.cached else ''}"
                f"{f' (device group {self.group[0]} of {self.group[1]})' if self.group[1] > 1 else ''} -> "
                f"table {self.table}, weights_id {self.weights_id}")


def decode_failure(exc: Exception, kept: str = "the chunks embedded before it are kept") -> str:
    """One line for an image that failed to decode in a DataLoader worker (which wraps the message in its
    traceback; the reason is its last line), saying what was kept."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1].split("ImageDecodeError: ", 1)[-1] if lines else str(exc)
    return (f"{reason}; {kept}. Fix or remove the file (or re-import the cohort with verification and --skip-bad) "
            "and run the same command again: it resumes")


def _record_weights(store: Store, spec: ModelSpec, model, weights_id: str, source: str) -> None:
    row = {"model": spec.name, "weights_id": weights_id, "source": source, "embed_dim": model.embed_dim,
           "logit_scale": float(model.zeroshot_logit_scale()), "zeroshot_rule": spec.family.zeroshot_rule,
           "created_at": datetime.now(timezone.utc)}
    store.upsert("weights", pa.Table.from_pylist([row], schema=schemas.WEIGHTS), ["model", "weights_id"],
                 schemas.WEIGHTS)


def _refuse_other_settings(store: Store, model: str, weights_id: str, cohort: str, settings: EmbeddingSettings,
                           n_done: int) -> None:
    """Vectors of one (model, weights_id, cohort) are computed one way: a pass that would add rows computed
    otherwise is refused before anything is written."""
    stored = embedding_settings(store, model, weights_id, cohort)
    if not stored.same_as(settings):
        raise EmbedSettingsError(
            f"the {n_done} rows of cohort '{cohort}' already embedded with {weights_id} were computed with "
            f"{stored.describe()}; this pass would use {settings.describe()}. Run it with the stored settings "
            "to resume, or with --force to re-embed every row (nothing was changed)")


def _prompt_sets_for(spec: ModelSpec, extra: list[str]) -> list[str]:
    sets = list(spec.family.prompt_sets)
    return sets + [s for s in extra if s not in sets]


def _prompt_sets_of(spec: ModelSpec, rows: pd.DataFrame, classes: tuple[str, ...],
                    extra: list[str]) -> dict[str, dict[str, list[str]]]:
    """{set: {class: prompts}} a pass embeds: the family's sets (and ``extra``) for the single-label classes; over a
    multi-label cohort (:func:`cohort_task`) also its multi-label pair sets for every label, and a family set that
    has no prompts for those classes (CheXpert-style sets cover six findings) is left out rather than refused."""
    from embedkit.constants import MULTILABEL
    from embedkit.models.prompts import PromptError

    if cohort_task(rows) != MULTILABEL:
        return dict(spec.family.prompts(raw, classes) for raw in _prompt_sets_for(spec, extra))
    labels = cohort_labels(rows)
    sets = {}
    for raw in _prompt_sets_for(spec, [s for s in extra if s not in spec.family.multilabel_prompt_sets]):
        try:
            name, by_class = spec.family.prompts(raw, classes)
        except PromptError:
            if raw in extra:
                raise
            continue
        sets[name] = by_class
    sets.update(spec.family.prompts(raw, labels) for raw in spec.family.multilabel_prompt_sets)
    return sets


def _prompt_pairs(by_class: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(cls, text) for cls, texts in by_class.items() for text in texts]


def _stored_prompts(store: Store, model: str, weights_id: str, prompt_set: str) -> list[tuple[str, str]]:
    """(class, prompt) of a stored set in prompt_index order; empty when the set was never embedded."""
    table = prompts_table(model)
    if not store.has(table):
        return []
    where = f"{sql_eq('weights_id', weights_id)} AND {sql_eq('prompt_set', prompt_set)}"
    stored = store.read(table, where, ["class", "prompt", "prompt_index"]).to_pandas().sort_values("prompt_index")
    return list(stored[["class", "prompt"]].itertuples(index=False, name=None))


def _changed_sets(store: Store, model: str, weights_id: str, sets: dict[str, dict[str, list[str]]]) -> list[str]:
    """The sets whose stored prompts are not these strings in this order (or that were never embedded)."""
    return [name for name, by_class in sets.items()
            if _stored_prompts(store, model, weights_id, name) != _prompt_pairs(by_class)]


def _refuse_stale_extras(cohort: str, weights_id: str, changed: list[str]) -> None:
    """Per-image extras (GLoRIA's local similarities) are computed against each set's prompts when an image is
    embedded: a set that differs from the stored one (embedkit changed it, or its file did) or is new would leave
    the images already embedded with similarities to other prompts, or none. Refused before anything is written."""
    if changed:
        raise CohortError(f"prompt set(s) {', '.join(changed)} differ from what the images of cohort '{cohort}' "
                          f"already embedded with {weights_id} were scored against: run the same command with "
                          "--force to re-embed them (nothing was changed)")


@torch.inference_mode()
def embed_prompts(store: Store, spec: ModelSpec, model, weights_id: str, sets: dict[str, dict[str, list[str]]],
                  names: list[str], device: torch.device) -> None:
    """Embed the prompt sets ``names`` of ``sets`` ({set name: {class: prompts}}), each replacing its stored copy.

    A class's prompts are tokenised together: MedCLIP averages over padded positions, so padding is part of
    what the authors computed.
    """
    table = prompts_table(spec.name)
    for name in names:
        by_class = sets[name]
        where = f"{sql_eq('weights_id', weights_id)} AND {sql_eq('prompt_set', name)}"
        rows, index = [], 0
        for cls, texts in by_class.items():
            tokens = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model.tokenize(texts).items()}
            vectors = model.encode_text(tokens).float().cpu().numpy()
            for text, vec in zip(texts, vectors):
                rows.append({"model": spec.name, "weights_id": weights_id, "prompt_set": name, "class": cls,
                             "prompt_index": index, "prompt": text, "vector": vec.tolist()})
                index += 1
        schema = schemas.prompts_schema(model.embed_dim)
        store.delete(table, where)  # a set is replaced whole: its prompt_index order must stay consistent
        store.append(table, pa.Table.from_pylist(rows, schema=schema), schema)


def _rows_to_write(rows: pd.DataFrame, spec: ModelSpec, weights_id: str, vectors: np.ndarray, dim: int) -> pa.Table:
    frame = rows[["row_id", "cohort", "image_id"]].copy()
    frame["model"] = spec.name
    frame["weights_id"] = weights_id
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, dim))
    return table


def embed_cohort(
    store: Store,
    spec: ModelSpec,
    model,
    weights_id: str,
    source: str,
    cohort: str,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    force: bool = False,
    extra_prompt_sets: list[str] | None = None,
    chunk_images: int = 256,
    progress: bool | Callable[[int, int], None] = True,
    amp: str = "none",
    preprocess: str | None = None,
) -> EmbedSummary:
    """Embed every row of ``cohort`` not yet embedded with ``weights_id`` (all rows with ``force``), and the prompts.

    ``progress``: a progress bar (True), none (False), or a callable given (images done, images to do) once before
    the first batch and after every batch, for callers that print their own lines (the demo, into a pipe).

    ``amp``: ``none`` (fp32), or ``bf16`` / ``fp16`` autocast of the image pass (CUDA only; refused elsewhere);
    ``preprocess``: one of the family's preprocessings (None: its default). Both are recorded with the vectors;
    rows already stored under other settings refuse the pass (``force`` re-embeds them). One pass at a time per
    (model, weights_id, cohort): a second one is refused (StoreBusy) instead of writing every row again, since a
    pass appends the rows its table lacked when it started.
    """
    return embed_models(store, [ToEmbed(spec, model, weights_id, source, preprocess)], cohort, device, batch_size,
                        workers, force, extra_prompt_sets, chunk_images, progress, amp)[0]


@dataclass
class ToEmbed:
    """One model of a pass: its spec, the built model, its weights_id and source, and its preprocessing (None:
    the family's default)."""

    spec: ModelSpec
    model: object
    weights_id: str
    source: str
    preprocess: str | None = None


def embed_models(store: Store, models: list[ToEmbed], cohort: str, device: str = "auto", batch_size: int = 64,
                 workers: int = 2, force: bool = False, extra_prompt_sets: list[str] | None = None,
                 chunk_images: int = 256, progress: bool | Callable[[int, int], None] = True,
                 amp: str = "none", device_memory: int | None = None) -> list[EmbedSummary]:
    """:func:`embed_cohort` for several models at once: each image is decoded once and given to every model that
    lacks it, through that model's own preprocessing (the same tensor a one-model pass feeds it); each model's
    vectors go to its own table in its own chunks, written as a one-model pass writes them.

    Models whose weights do not fit on the device together run in groups (:func:`device_groups`), one after the
    other, each group decoding the images once; ``device_memory`` (bytes) overrides the budget the device reports.
    """
    names = [m.spec.name for m in models]
    if len(set(names)) != len(names):
        raise EmbedSettingsError(f"--model names a model twice ({', '.join(names)})")
    with ExitStack() as locks:
        for m in models:
            locks.enter_context(store.embedding_lock(m.spec.name, m.weights_id, cohort))
        dev = resolve_device(device)
        check_amp(amp, dev)
        rows = load_cohort(store, cohort)
        classes = cohort_classes(rows)
        if not classes:
            raise CohortError(f"cohort '{cohort}' has no single-label rows: no classes to embed prompts for")
        cohort_paths = list(dict.fromkeys(rows["path"]))
        groups = device_groups([m.model for m in models], dev, device_memory)
        summaries = []
        for number, group in enumerate(groups, 1):
            passes = [_prepare(store, models[k], rows, classes, cohort, dev, force, extra_prompt_sets or [], amp,
                               cohort_paths) for k in group]
            paths = list(dict.fromkeys(p for one in passes for p in one.todo["path"]))  # cohort order, once each
            start = time.perf_counter()
            if paths:
                _embed_paths(store, passes, paths, dev, batch_size, workers, chunk_images, progress, amp)
            seconds = time.perf_counter() - start
            summaries += [EmbedSummary(one.spec.name, one.weights_id, cohort, len(one.paths), len(one.todo),
                                       one.skipped, seconds, one.table, one.source is not None,
                                       (number, len(groups))) for one in passes]
            if len(groups) > 1:  # give the device back to the next group
                for one in passes:
                    one.model.to("cpu")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        return summaries


def channels_last(model, dev: torch.device) -> bool:
    """Whether the pass gives ``model`` channels-last batches (and weights): a CNN tower on CUDA, where cuDNN's
    NHWC convolutions are faster; the vectors agree with contiguous ones to float rounding."""
    return dev.type == "cuda" and model.convolutional()


def weight_bytes(model) -> int:
    """Bytes of a model's parameters and buffers: what it holds on the device between batches."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# Of the memory a CUDA device reports free, the share the models' weights may take together; the rest is for one
# model's activations at a time (the models of a group run one after the other on each batch), the batch and the
# allocator's slack.
WEIGHTS_SHARE = 0.6


def device_groups(models: list, dev: torch.device, budget: int | None = None) -> list[list[int]]:
    """Positions of ``models`` split into consecutive groups whose weights fit the device together.

    ``budget`` (bytes; default: ``WEIGHTS_SHARE`` of the free memory a CUDA device reports, unlimited on the
    CPU). A group is closed when the next model would take it over the budget; a model larger than the budget
    runs alone (and may still fit: the budget keeps room for activations).
    """
    if budget is None:
        if dev.type != "cuda":
            return [list(range(len(models)))]
        free, _ = torch.cuda.mem_get_info(dev)
        budget = int(free * WEIGHTS_SHARE)
    groups: list[list[int]] = []
    used = 0
    for k, model in enumerate(models):
        size = weight_bytes(model)
        if groups and used + size <= budget:
            groups[-1].append(k)
            used += size
        else:
            groups.append([k])
            used = size
    return groups


@dataclass
class _ModelPass:
    """One model's share of a pass: what it writes where, what it lacks, and the vectors waiting for a chunk."""

    spec: ModelSpec
    model: object
    weights_id: str
    transform: object
    settings: EmbeddingSettings
    table: str
    schema: pa.Schema
    memory_format: torch.memory_format  # of the batches on the device (see channels_last)
    todo: pd.DataFrame = field(default_factory=pd.DataFrame)  # the cohort rows without a vector
    skipped: int = 0  # rows already embedded with these weights
    sets: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # the prompt sets it embedded
    paths: list[str] = field(default_factory=list)  # the distinct images of ``todo``
    local_inputs: dict = field(default_factory=dict)
    pending_idx: list[np.ndarray] = field(default_factory=list)  # positions in the pass's path list
    pending_vec: list[np.ndarray] = field(default_factory=list)
    pending_sim: dict[str, list[np.ndarray]] = field(default_factory=dict)
    source: object = None  # the pixel cache's entry for ``transform`` (None: decode the files)

    @property
    def pending(self) -> int:
        return sum(len(i) for i in self.pending_idx)

    @classmethod
    def on_device(cls, m: ToEmbed, dev: torch.device, amp: str) -> "_ModelPass":
        """``m``'s share of a pass before its rows are known: the model in eval mode on ``dev`` (channels-last
        where that helps), its preprocessing, the settings its vectors are computed under, its table and schema."""
        model = m.model.to(dev).eval()
        memory_format = torch.channels_last if channels_last(model, dev) else torch.preserve_format
        model = model.to(memory_format=memory_format)
        settings = EmbeddingSettings(amp, m.preprocess or model.default_preprocessing())
        return cls(m.spec, model, m.weights_id, model.image_transform(m.preprocess), settings,
                   embeddings_table(m.spec.name), schemas.embeddings_schema(model.embed_dim), memory_format)


def _prepare(store: Store, m: ToEmbed, rows: pd.DataFrame, classes, cohort: str, dev: torch.device, force: bool,
             extra_prompt_sets: list[str], amp: str, cohort_paths: list[str] | None = None) -> _ModelPass:
    """Check one model's settings against its stored vectors, record them, embed its prompts: everything before
    its first image vector."""
    one = _ModelPass.on_device(m, dev, amp)
    spec, weights_id, model, table, settings = one.spec, one.weights_id, one.model, one.table, one.settings
    store.check_vector_width(table, one.schema)  # fail before the pass, not at its first write
    where = f"{sql_eq('weights_id', weights_id)} AND {sql_eq('cohort', cohort)}"
    if force:
        store.delete(table, where)
        store.delete(localsim_table(spec.name), f"{sql_eq('weights_id', weights_id)} AND row_id LIKE '{cohort}/%'")
    done = set(store.read(table, where, ["row_id"])["row_id"].to_pylist()) if store.has(table) else set()
    if done:
        _refuse_other_settings(store, spec.name, weights_id, cohort, settings, len(done))
    # {set: {class: prompts}} in prompt_index order; the sets whose stored strings differ are embedded again.
    sets = _prompt_sets_of(spec, rows, classes, extra_prompt_sets)
    changed = list(sets) if force else _changed_sets(store, spec.name, weights_id, sets)
    if done and spec.family.uses_local_similarity:
        _refuse_stale_extras(cohort, weights_id, changed)
    _record_settings(store, spec.name, weights_id, cohort, settings)  # before any vector written under them
    _record_weights(store, spec, model, weights_id, m.source)
    embed_prompts(store, spec, model, weights_id, sets, changed, dev)
    one.todo, one.skipped, one.sets = rows[~rows["row_id"].isin(done)], len(done), sets
    one.paths = list(dict.fromkeys(one.todo["path"]))
    if cohort_paths is None:
        cohort_paths = list(dict.fromkeys(rows["path"]))
    one.source = pixels.usable_source(store.path, cohort, one.transform.recipe(), cohort_paths)
    # What the family's per-image extras need of the prompts (GLoRIA: word features), encoded once for the pass.
    one.local_inputs = model.prompt_context({name: [t for ts in by_class.values() for t in ts]
                                             for name, by_class in sets.items()})
    one.pending_sim = {name: [] for name in one.local_inputs}
    return one


class _ThreadBudget:
    """Gives the CPU cores to the decoding workers when decoding, not the model, limits the pass.

    On a small CPU, DataLoader workers that are always busy and a model running on every core oversubscribe it
    and every thread waits on the others (measured: a tiny model's forward 7x slower). After a few batches, if the
    main process spent more time waiting for images than computing, the model keeps one thread per spare core.
    """

    WARMUP_BATCHES = 2

    def __init__(self, device: torch.device, workers: int):
        self.active = device.type == "cpu" and workers > 0
        self.original = torch.get_num_threads()
        self.waited = self.computed = 0.0
        self.batches = 0

    def observe(self, waited: float, computed: float) -> None:
        if not self.active:
            return
        self.batches += 1
        if self.batches > 1:  # the first wait includes the workers' start-up
            self.waited += waited
            self.computed += computed
        if self.batches == self.WARMUP_BATCHES + 1:
            self.active = False
            if self.waited > self.computed:
                import os

                torch.set_num_threads(max(1, min(self.original, (os.cpu_count() or 1) - 1)))

    def restore(self) -> None:
        torch.set_num_threads(self.original)


def _embed_paths(store: Store, passes: list[_ModelPass], paths: list[str], dev: torch.device, batch_size: int,
                 workers: int, chunk_images: int, progress: bool | Callable[[int, int], None], amp: str) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    wanted = [set(one.paths) for one in passes]
    needs = [tuple(path in w for w in wanted) for path in paths]
    loader = torch.utils.data.DataLoader(
        MultiImageFiles(paths, [one.transform for one in passes], needs, [one.source for one in passes]),
        batch_size=batch_size, num_workers=workers,
        collate_fn=collate_images, pin_memory=dev.type == "cuda", prefetch_factor=4 if workers else None,
        # lancedb holds an async runtime that fork() can leave mid-operation: start workers fresh instead.
        multiprocessing_context="forkserver" if workers else None,
    )
    autocast = autocast_context(dev, amp)
    width = max(len(one.spec.name) for one in passes)
    columns = [TextColumn("embed {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.1f} img/s"), TimeElapsedColumn()]
    threads = _ThreadBudget(dev, workers)
    start = time.perf_counter()
    try:
        report = progress if callable(progress) else None
        decoded = 0
        with Progress(*columns, disable=not progress or report is not None, transient=False) as bar, \
                torch.inference_mode():
            tasks = [bar.add_task(one.spec.name.ljust(width), total=len(one.paths), rate=0.0) for one in passes]
            embedded = [0] * len(passes)  # images each model has been given
            if report:
                report(0, len(paths))
            batches = iter(loader)
            while True:
                waited = time.perf_counter()
                try:
                    index, per_model = next(batches)
                except StopIteration:
                    break
                except ImageDecodeError as exc:  # from a worker: its message carries the worker's traceback
                    raise ImageDecodeError(decode_failure(exc)) from None
                computing = time.perf_counter()
                for m, (one, task, (chosen, pixels)) in enumerate(zip(passes, tasks, per_model)):
                    if not len(chosen):
                        continue
                    with autocast:
                        batch = pixels.to(dev, non_blocking=True, memory_format=one.memory_format)
                        vectors, sims = one.model.encode_image_extras(batch, one.local_inputs)
                    for name, sim in sims.items():
                        one.pending_sim[name].append(sim)
                    one.pending_idx.append(index[chosen].numpy())
                    one.pending_vec.append(vectors.float().cpu().numpy())
                    embedded[m] += len(chosen)
                    bar.update(task, completed=embedded[m], rate=embedded[m] / (time.perf_counter() - start))
                    if one.pending >= chunk_images:
                        _flush(store, one, paths)
                threads.observe(computing - waited, time.perf_counter() - computing)
                decoded += len(index)
                if report:
                    report(decoded, len(paths))
            for one in passes:
                _flush(store, one, paths)
    finally:
        threads.restore()


def _flush(store: Store, one: _ModelPass, paths: list[str]) -> None:
    """Write one model's pending vectors (and per-image extras) as one chunk: the rows of those images."""
    if not one.pending_idx:
        return
    idx = np.concatenate(one.pending_idx)
    vec = np.concatenate(one.pending_vec)
    chunk_paths = [paths[i] for i in idx]
    position = {p: k for k, p in enumerate(chunk_paths)}
    chunk_rows = one.todo[one.todo["path"].isin(position)]
    order = chunk_rows["path"].map(position).to_numpy()
    spec, weights_id = one.spec, one.weights_id
    for name, sims in one.pending_sim.items():  # local similarities first: the vectors mark a row as done
        sim = np.concatenate(sims)[order]
        n = len(chunk_rows)
        local = pa.table({"row_id": chunk_rows["row_id"].to_numpy(), "model": [spec.name] * n,
                          "weights_id": [weights_id] * n, "prompt_set": [name] * n,
                          "similarity": [s.tolist() for s in sim]})
        store.upsert(localsim_table(spec.name), local, ["row_id", "weights_id", "prompt_set"],
                     schemas.LOCAL_SIMILARITY)  # upsert: rows of a chunk killed before its vectors landed
        sims.clear()
    # Append, not upsert (50x cheaper): the pass only embeds rows the table lacked when it started.
    store.append(one.table, _rows_to_write(chunk_rows, spec, weights_id, vec[order], one.model.embed_dim),
                 one.schema)
    one.pending_idx.clear()
    one.pending_vec.clear()
