"""The `embedkit` command line. Commands are thin: they parse options and call the library.

Heavy libraries (torch, open_clip, lancedb, ...) are imported inside commands so `embedkit --help` stays instant.
"""

from __future__ import annotations

import os
import sys
import traceback
from functools import partial
from pathlib import Path
from typing import Optional

import typer

from embedkit import __version__
from embedkit.constants import MIN_GROUP_N, STORE_ENV
from embedkit.errors import EmbedkitError
from embedkit.fairness.db import DEFAULT_ATTRIBUTES
from embedkit.options import (Amp, Ensemble, FinetuneMethod, Head, LibraryDefault, LoraPreset, Method, Schedule, Split,
                              by_option, parse_by)
from embedkit.options import Task, task_option, threshold_rule_option  # multi-label heads (docs/multilabel.md)
from embedkit.output import OutputFormat, echo_json, print_run

app = typer.Typer(
    help="Fairness audits of CLIP-style medical vision-language models, around an embedding store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Defaults stated once, in the library (read when the command runs or shows its --help).
_EMBED = partial(LibraryDefault, "embedkit.embed", "embed_cohort")

data_app = typer.Typer(help="Cohorts: NIH protocols, manifest import, synthetic X-rays, counts.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"embedkit {__version__}")
        raise typer.Exit()


# The --store this invocation named, kept for main(): an internal error's log goes into that store.
_invocation: dict[str, Optional[str]] = {}


@app.callback()
def _main(
    ctx: typer.Context,
    store: Optional[str] = typer.Option(  # text, not a Path: an s3:// location must keep its '//'
        None, "--store", envvar=STORE_ENV, help="Store directory (LanceDB), or s3://bucket/prefix (docs/scaleout.md). "
        "Default: ./embedkit-store"
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    ctx.obj = {"store": store}
    _invocation["store"] = store


def get_store(ctx: typer.Context, create: bool = False):
    """The Store named by the global --store option (or $EMBEDKIT_STORE, or ./embedkit-store). A command that only
    reads a store (``create=False``) is refused when there is none, rather than answering as if it were empty."""
    from embedkit.store.store import Store

    store = Store(ctx.obj["store"] if ctx.obj else None)
    return store if create else store.require()


# Recent Typer releases ship their own copy of click (typer._click), older ones use click itself: take the
# exception classes from typer's BadParameter, whichever click that is.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
DEBUG_ENV = "EMBEDKIT_DEBUG"
# What the operating system refuses because of where the store lives (a full disk, a read-only store, no
# permission): the user's to fix, not a bug.
_REFUSED_WRITES = ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM")


def _fail(message: str, code: int) -> None:
    """One ``error:`` line and exit ``code``; with $EMBEDKIT_DEBUG set, the traceback being handled first."""
    if os.environ.get(DEBUG_ENV) and sys.exc_info()[0] is not None:
        traceback.print_exc()
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(code)


def _usage_message(exc) -> str:
    """A usage error as one line: the option and what is wrong with it (the valid choices, where click lists
    them), and where the options are listed."""
    if isinstance(exc, typer.BadParameter) and exc.param is None and exc.param_hint is None:
        return " ".join(exc.message.split())  # raised by a command with its whole sentence
    text = " ".join(exc.format_message().split()).replace("Value error, ", "").rstrip(".")
    text = text[:1].lower() + text[1:]
    return text + (f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else "")


def _issue_tracker() -> str:
    """Where bugs go: the Issues / Bug Tracker URL of embedkit's installed metadata, where it names one."""
    from importlib import metadata

    try:
        urls = metadata.metadata("embedkit").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("issues", "bug tracker", "tracker", "bugs") and url.strip():
            return url.strip()
    return "the embedkit issue tracker"


def _write_bug_log() -> Path:
    """The traceback being handled, in ``<store>/_logs/<timestamp>-<pid>.log``, or in a temporary file where there
    is no usable store (a log never creates a store)."""
    import tempfile
    from datetime import datetime

    from embedkit.store.store import LOGS_DIR, resolve_store_path

    name = f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    text = f"embedkit {__version__}\nargv: {sys.argv!r}\n\n{traceback.format_exc()}"
    store = resolve_store_path(_invocation.get("store"))
    if store.is_dir():
        try:
            (store / LOGS_DIR).mkdir(exist_ok=True)
            (store / LOGS_DIR / name).write_text(text)
            return (store / LOGS_DIR / name).absolute()
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix="embedkit-", suffix=f"-{name}")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(path)


def main() -> None:
    """Console entry point: every user error is one `error:` line on stderr (no box, no traceback), exit 2 for a
    usage error (an unknown, missing or bad option) and 1 for the rest. Anything else is a bug: one line saying so,
    the traceback in a log file. $EMBEDKIT_DEBUG=1 prints the traceback too."""
    import errno

    _invocation.clear()
    try:
        code = app(standalone_mode=False)
    except _USAGE_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(exc.exit_code)  # `embedkit` alone: the help, printed already
        _fail(_usage_message(exc), exc.exit_code)
    except _CLICK_EXCEPTION as exc:  # e.g. a file option that cannot be opened
        _fail(" ".join(exc.format_message().split()), exc.exit_code)
    except typer.Abort:
        _fail("aborted", 1)
    except EmbedkitError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted: nothing after the last completed step was recorded (a run is stored whole or not at "
              "all); run the command again to go on", 130)
    except Exception as exc:
        refused = isinstance(exc, OSError) and errno.errorcode.get(exc.errno) in _REFUSED_WRITES
        if refused:
            where = f" ({exc.filename})" if exc.filename else ""
            _fail(f"{exc.strerror}{where}: nothing after the last completed step was recorded (a run is stored "
                  "whole or not at all); fix that and run the command again", 1)
        from embedkit.store.store import missing_data_file  # here: `embedkit --help` imports no pyarrow

        damaged = missing_data_file(exc)
        if damaged is not None:
            _fail(str(damaged), 1)
        if os.environ.get(DEBUG_ENV):
            raise
        log = _write_bug_log()
        what = " ".join(str(exc).split())
        what = what if len(what) <= 300 else what[:300] + "..."
        _fail(f"internal error: {type(exc).__name__}: {what} — this is a bug; please report it at "
              f"{_issue_tracker()} with {log}", 1)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(n) comes back as n without standalone mode


# ---- data ------------------------------------------------------------------------------------------------------


def _imported(ctx, built, manifest_out: Optional[Path]) -> None:
    """After an import (a :class:`embedkit.data.build.BuiltCohort`): write the manifest if asked; one summary line."""
    from embedkit.data.cohort import write_manifest

    if manifest_out:
        write_manifest(built.rows, manifest_out)
        typer.echo(f"manifest written: {manifest_out}")
    result = built.result
    rejected = f", {result.rejected} rejected (see the rejects table)" if result.rejected else ""
    store = get_store(ctx, create=True).path
    typer.echo(f"cohort '{result.cohort}': {result.imported} rows imported into {store}{rejected}")


@data_app.command("nih")
def data_nih(
    ctx: typer.Context,
    protocol: str = typer.Option("nih6x200", help="nih6x200 (clean, default) | nih6x200-paper (the study's, leaks) | nih (all images)"),
    metadata: Optional[Path] = typer.Option(None, help="Data_Entry_2017_v2020.csv[.gz]; the 6x200 manifests ship with embedkit"),
    images: Optional[Path] = typer.Option(None, help="Folder of the NIH PNGs (images_*/images flattened or not: file names are looked up here)"),
    cohort: Optional[str] = typer.Option(None, help="Cohort name in the store (default: the protocol name)"),
    manifest_out: Optional[Path] = typer.Option(None, help="Also write the cohort as CSV here"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every image exists and decodes"),
    skip_bad: bool = typer.Option(False, help="Import the good rows and record the bad ones in the rejects table"),
    split_lists: Optional[Path] = typer.Option(None, help="--protocol nih: folder with NIH's train_val_list.txt and "
                                                          "test_list.txt (default: a seeded patient-level split)"),
) -> None:
    """NIH ChestX-ray14 cohorts: the paper's 6x200 (exact, leaks), a clean 6x200, or all 112,120 images."""
    from embedkit.data import nih
    from embedkit.data.build import import_nih

    if protocol not in nih.PROTOCOLS:
        raise typer.BadParameter(f"unknown protocol '{protocol}'; choose one of {', '.join(nih.PROTOCOLS)}")
    if split_lists is not None and protocol != nih.PROTOCOL_FULL:
        raise typer.BadParameter(f"--split-lists applies to --protocol {nih.PROTOCOL_FULL} only")
    if metadata is not None:
        frame = nih.cohort_for(protocol, nih.read_metadata(metadata), split_lists)
    elif protocol == nih.PROTOCOL_FULL:
        raise typer.BadParameter("--protocol nih needs --metadata Data_Entry_2017_v2020.csv[.gz]")
    else:
        frame = nih.shipped_manifest(protocol)
    if images is None and verify:
        raise typer.BadParameter("--images DIR is needed to verify the images (or pass --no-verify)")
    if protocol == nih.PROTOCOL_PAPER:
        leaks = nih.leak_report(frame)
        typer.secho("WARNING: nih6x200-paper reproduces the study's cohort, which leaks: "
                    + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in leaks.items()), fg=typer.colors.YELLOW, err=True)
    built = import_nih(get_store(ctx, create=True), protocol, frame, images, cohort, verify, skip_bad)
    _imported(ctx, built, manifest_out)


@data_app.command("import")
def data_import(
    ctx: typer.Context,
    manifest: Path = typer.Argument(..., help="CSV with one row per image"),
    images: Optional[Path] = typer.Option(None, help="Folder the image paths / image_ids are relative to"),
    cohort: str = typer.Option(..., help="Cohort name in the store"),
    map_: list[str] = typer.Option([], "--map", help="column=field, e.g. --map Path=image_id --map Sex=sex"),
    classes: Optional[str] = typer.Option(None, help="Comma-separated allowed labels (others are rejected)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every image exists and decodes"),
    skip_bad: bool = typer.Option(False, help="Import the good rows and record the bad ones in the rejects table"),
    manifest_out: Optional[Path] = typer.Option(None, help="Also write the cohort as CSV here"),
    allow_outside_images: bool = typer.Option(False, help="Accept image paths that lead outside --images ('..', "
                                                          "absolute paths, symlinks); refused by default"),
) -> None:
    """Import any other dataset (CheXpert-, MIMIC-, PadChest-style CSV) mapped onto embedkit's fields."""
    from embedkit.data.build import import_rows
    from embedkit.data.cohort import parse_mapping, read_manifest

    frame = read_manifest(manifest, parse_mapping(map_))
    allowed = tuple(c.strip() for c in classes.split(",")) if classes else None
    built = import_rows(get_store(ctx, create=True), frame, cohort, images, allowed, verify=verify, skip_bad=skip_bad,
                        allow_outside_images=allow_outside_images)
    _imported(ctx, built, manifest_out)


@data_app.command("synth")
def data_synth(
    ctx: typer.Context,
    out: Optional[Path] = typer.Option(None, help="Folder for the PNGs (needed unless --vectors)"),
    cohort: str = typer.Option("nih6x200", help="Manifest to synthesise: nih6x200, nih6x200-paper, a CSV path, or "
                                                "nih (multi-label, from --metadata)"),
    name: str = typer.Option("synthetic", help="Cohort name in the store"),
    size: int = typer.Option(256, help="Image side in pixels"),
    seed: int = typer.Option(0, help="Seed (same seed, same bytes)"),
    bias: Optional[str] = typer.Option(None, help="Planted unfairness, e.g. 'sex=F:signal=0.3' or 'age_group=old:label_noise=0.4'"),
    manifest_out: Optional[Path] = typer.Option(None, help="Also write the cohort as CSV here"),
    metadata: Optional[Path] = typer.Option(None, help="--cohort nih: Data_Entry_2017_v2020.csv[.gz], whose label "
                                                       "lists, ages, sexes and views the images take"),
    limit: Optional[int] = typer.Option(None, help="--cohort nih: only the first N images of the metadata"),
    vectors: Optional[int] = typer.Option(None, help="--cohort nih: draw no images; write vectors of this width "
                                                     "directly (model synthetic-vectors)"),
    sex_differences: bool = typer.Option(True, "--sex-differences/--no-sex-differences",
                                         help="Draw women's and men's anatomy apart (off: no sex signal in the images)"),
) -> None:
    """Synthetic chest X-rays for every row of a manifest (real ages and sexes), imported as a cohort.

    --cohort nih: a multi-label cohort from the real metadata (all findings, patient-level split)."""
    from embedkit.data import nih
    from embedkit.data.build import import_synthetic, import_synthetic_multilabel

    if cohort == nih.PROTOCOL_FULL:
        if metadata is None:
            raise typer.BadParameter("--cohort nih needs --metadata Data_Entry_2017_v2020.csv[.gz]")
        built = import_synthetic_multilabel(get_store(ctx, create=True), metadata, out, limit=limit, cohort=name,
                                            size=size, seed=seed, bias=bias, vectors=vectors)
        what = f"{built.images} synthetic images written to {out}" if vectors is None else \
            f"{built.result.imported} rows with synthesised {vectors}-d vectors (model synthetic-vectors)"
        typer.echo(f"{what} in {built.seconds:.1f} s" + (f" (bias: {built.bias})" if built.bias else ""))
        _imported(ctx, built, manifest_out)
        return
    if limit is not None or vectors is not None or metadata is not None:
        raise typer.BadParameter("--metadata, --limit and --vectors apply to --cohort nih only")
    if out is None:
        raise typer.BadParameter("--out DIR is needed for the PNGs")
    built = import_synthetic(get_store(ctx, create=True), out, manifest=cohort, cohort=name, size=size, seed=seed,
                             bias=bias, sex_differences=sex_differences)
    typer.echo(f"{built.images} synthetic images written to {out} in {built.seconds:.1f} s"
               + (f" (bias: {built.bias})" if built.bias else ""))
    _imported(ctx, built, manifest_out)


@data_app.command("info")
def data_info(
    ctx: typer.Context,
    cohort: Optional[str] = typer.Option(None, help="Cohort name (default: every cohort)"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Counts per split x label x age_group x sex, and the problems found."""
    from embedkit.data.cohort import cohort_counts, cohort_names, cohort_problems, load_cohort
    from embedkit.store.store import sql_eq

    store = get_store(ctx)
    names = [cohort] if cohort else cohort_names(store)
    if not names:
        typer.echo(f"no cohorts in {store.path}")
        raise typer.Exit()
    report = {}
    for name in names:
        rows = load_cohort(store, name)
        rejects = store.read("rejects", sql_eq("cohort", name)).to_pandas() if store.has("rejects") else None
        counts = cohort_counts(rows)
        problems = cohort_problems(rows, rejects)
        cache = _pixel_cache_state(store, name, rows)
        report[name] = {"rows": len(rows), "problems": problems,
                        "counts": {" / ".join(map(str, k)): v for k, v in counts.stack(["age_group", "sex"]).items()},
                        "pixel_cache": cache}
        if not as_json:
            typer.echo(f"cohort '{name}': {len(rows)} rows")
            typer.echo(counts.to_string())
            typer.echo("problems: " + ("; ".join(problems) if problems else "none found"))
            if not cache:
                typer.echo("pixel cache: none (embedkit data cache; fine-tuning builds its own)")
            for entry in cache:
                typer.echo(f"pixel cache: {entry['recipe']}: {entry['images']} images, {entry['bytes'] / 2**20:.1f} "
                           f"MiB, {entry['state']}, in {entry['folder']}")
    if as_json:
        echo_json(report)


def _pixel_cache_state(store, cohort: str, rows) -> list[dict]:
    """The cohort's pixel-cache entries: recipe, size, folder, and whether they still match the image files."""
    from embedkit.data import pixels

    paths = list(dict.fromkeys(rows["path"]))
    out = []
    for entry in pixels.entries(store.path):
        if entry.cohort != cohort:
            continue
        stale = entry.stale(paths)
        state = ("current" if stale == [] else "out of date: the cohort's images changed" if stale is None
                 else f"out of date: {len(stale)} image file(s) changed since")
        out.append({"recipe": entry.recipe, "images": len(entry.paths), "bytes": entry.nbytes,
                    "folder": str(entry.folder), "state": state, "created_at": entry.created_at})
    return out

@data_app.command("cache")
def data_cache(
    ctx: typer.Context,
    cohort: str = typer.Option("nih6x200", help="Cohort in the store"),
    model: str = typer.Option("all", help="Model(s) whose preprocessing to cache, comma-separated, or all (every "
                              "model whose weights are found; with --random-init every tiny model: the same recipes)"),
    weights: Optional[Path] = typer.Option(None, help="Weights file or folder in the authors' format (one model)"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="EMBEDKIT_WEIGHTS", help="Folder with one sub-folder per model"),
    random_init: bool = typer.Option(False, help="Take the preprocessing of randomly initialised models"),
    seed: int = typer.Option(0, help="Seed of --random-init"),
    preprocess: Optional[str] = typer.Option(None, help="study | upstream where a family has both (MedCLIP)"),
    workers: int = typer.Option(_EMBED("workers"), help="DataLoader worker processes decoding images"),
    quiet: bool = typer.Option(False, help="No progress lines"),
) -> None:
    """Decode the cohort's images once and store, for each distinct preprocessing, the 8-bit pixels the models see
    before their tensor stage: fine-tuning epochs and embedding passes read them instead of the image files
    (`finetune` builds its own entry on first use)."""
    from embedkit.data import pixels
    from embedkit.data.cohort import load_cohort

    store = get_store(ctx)
    rows = load_cohort(store, cohort)
    paths = list(dict.fromkeys(rows["path"]))
    preprocessings = [m.model.image_transform(m.preprocess) for m in
                      _models_for(model, weights, weights_dir, random_init, seed, preprocess)]

    def progress(done: int, total: int) -> None:
        if not quiet and (done == total or done % 256 < 16):
            typer.echo(f"pixel cache: {done}/{total} images decoded", err=True)

    for summary in pixels.build(store, cohort, paths, preprocessings, workers=workers, progress=progress):
        typer.echo(summary.line())


# ---- models and embedding --------------------------------------------------------------------------------------


models_app = typer.Typer(help="The models: where each one's weights are, or how to get them; `pull NAME` fetches.")
app.add_typer(models_app, name="models")
_WEIGHTS_DIR_HELP = "Folder with one sub-folder per model"


@models_app.callback(invoke_without_command=True)
def models_cmd(
    ctx: typer.Context,
    weights_dir: Optional[Path] = typer.Option(None, envvar="EMBEDKIT_WEIGHTS", help=_WEIGHTS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Each model: embedding width, the files it needs, where they were found (the weights folder, then the Hugging
    Face cache) or how to get them. Reads local files only; `embedkit models pull NAME` fetches."""
    from embedkit.models.registry import MODELS

    if ctx.invoked_subcommand:
        return
    listing = []
    for spec in MODELS.values():
        found, place = (None, None) if spec.tiny else spec.locate_weights(None, weights_dir)
        listing.append({"model": spec.name, "embed_dim": spec.embed_dim, "description": spec.description,
                        "files": [] if spec.tiny else list(spec.weight_files),
                        "source": "random init only (test configuration)" if spec.tiny else spec.weight_source,
                        "hf_repo": spec.hf_repo,
                        "pullable": bool(spec.hf_repo or spec.releases) and all(r.url for r in spec.releases),
                        "found": str(found) if found else None, "found_in": place,
                        "unusable": None if spec.tiny or found else spec.unusable_copy(weights_dir),
                        "looked_in": None if spec.tiny or found else spec.looked_in(weights_dir),
                        "get": None if spec.tiny or found else spec.how_to_get()})
    if as_json:
        echo_json(listing)
        return
    for item in listing:
        status = (f"found ({item['found_in']}): {item['found']}" if item["found"]
                  else "random init only" if not item["files"]
                  else f"not usable: {item['unusable']}" if item["unusable"]
                  else f"not found (looked in {' and '.join(item['looked_in'])})")
        typer.echo(f"{item['model']:<20} dim {item['embed_dim']:<4} {status}")
        if item["files"]:
            typer.echo(f"{'':<20} needs {', '.join(item['files'])}")
        if item["get"]:
            typer.echo(f"{'':<20} to get them: {item['get']}")


@models_app.command("pull")
def models_pull_cmd(
    name: str = typer.Argument(..., help="Model name (see `embedkit models`)"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="EMBEDKIT_WEIGHTS",
                                               help=_WEIGHTS_DIR_HELP + " (where release files go)"),
    url: Optional[str] = typer.Option(None, help="Download link of a release file the authors give no fixed URL "
                                     "for (GLoRIA's and CheXzero's checkpoints, in Google Drive folders)"),
    quiet: bool = typer.Option(False, help="No progress bar"),
) -> None:
    """Fetch a model's released files: hub models into the Hugging Face cache, authors' release files
    (checksummed, resumable) into the weights folder. The only command that uses the network."""
    from embedkit.models.pull import pull
    from embedkit.models.registry import get_spec

    typer.echo(f"{name}: {pull(get_spec(name), weights_dir, progress=not quiet, url=url)}")


@app.command("embed")
def embed_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Model name (see `embedkit models`), several comma-separated (each image "
                              "decoded once for all), or all: every model whose weights are found (with "
                              "--random-init: every tiny model)"),
    cohort: str = typer.Option("nih6x200", help="Cohort in the store"),
    weights: Optional[Path] = typer.Option(None, help="Weights file or folder in the authors' format (one model)"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="EMBEDKIT_WEIGHTS", help="Folder with one sub-folder per model"),
    random_init: bool = typer.Option(False, help="Real architecture, random weights (labelled random-init in the store)"),
    seed: int = typer.Option(0, help="Seed of --random-init"),
    device: str = typer.Option(_EMBED("device"), help="auto | cpu | cuda | cuda:N"),
    batch_size: int = typer.Option(_EMBED("batch_size"), help="Images per forward pass"),
    workers: int = typer.Option(_EMBED("workers"), help="DataLoader worker processes decoding images"),
    prompts: list[str] = typer.Option([], help="Extra prompt set: a built-in set (docs/models.md) or a YAML/JSON "
                                      "file {class: [prompts]} (repeatable)"),
    force: bool = typer.Option(False, help="Re-embed rows already embedded with these weights (also under other "
                               "--amp/--preprocess settings)"),
    chunk_images: int = typer.Option(_EMBED("chunk_images"),
                                     help="Images per store commit (a killed run loses at most one chunk)"),
    amp: Amp = typer.Option(_EMBED("amp"), help="Image pass precision: none = fp32 (as the authors); bf16 | fp16 "
                                                "autocast, CUDA only. Recorded with the vectors"),
    preprocess: Optional[str] = typer.Option(None, help="study | upstream where a family has both (MedCLIP; "
                                             "default study); other families have one (docs/models.md). Recorded "
                                             "with the vectors"),
    shard: Optional[str] = typer.Option(None, help="I/N: embed only shard I of N (every N-th image) into "
                                        "uncommitted Lance fragments, for N workers on any scheduler; one model"),
    commit_shards: Optional[int] = typer.Option(None, help="N: commit the fragments of shards 0..N-1 (all "
                                                "finished) in one commit, with the prompts and settings"),
    quiet: bool = typer.Option(False, help="No progress bar"),
) -> None:
    """Embed a cohort's images and its class prompts with one model, or several at once, into the store."""
    from embedkit.device import resolve_device
    from embedkit.embed import check_amp, embed_models

    if weights and random_init:  # a usage error, before anything else is looked at
        raise typer.BadParameter("--weights and --random-init exclude each other")
    check_amp(amp.value, resolve_device(device))  # before the weights load
    store = get_store(ctx)  # a missing store is refused before any weights load
    models = _models_for(model, weights, weights_dir, random_init, seed, preprocess)
    if shard is not None or commit_shards is not None:
        summaries = [_embed_sharded(store, models, cohort, shard, commit_shards, force, device, batch_size, workers,
                                    prompts, chunk_images, quiet, amp.value)]
    else:
        summaries = embed_models(store, models, cohort, device=device, batch_size=batch_size, workers=workers,
                                 force=force, extra_prompt_sets=prompts, chunk_images=chunk_images,
                                 progress=not quiet, amp=amp.value)
    for summary in summaries:
        typer.echo(summary.line())


def _models_for(model: str, weights: Optional[Path], weights_dir: Optional[Path], random_init: bool, seed: int,
                preprocess: Optional[str]) -> list:
    """The models ``--model`` names, built with their weights (every one loads before anything is written), each
    with its preprocessing: exactly ``--preprocess`` for one model; for several, each family's of that name, else its
    only one."""
    from embedkit.embed import ToEmbed
    from embedkit.models.registry import get_spec, instantiate

    if weights and random_init:
        raise typer.BadParameter("--weights and --random-init exclude each other")
    specs = [get_spec(name) for name in _embed_model_names(model, random_init, weights_dir)]
    if weights and len(specs) > 1:
        raise typer.BadParameter("--weights names one model's files; with several models use --weights-dir (one "
                                 "sub-folder per model)")
    models = []
    for spec in specs:
        net, weights_id, source = instantiate(spec, weights, random_init, seed, weights_dir)
        chosen = preprocess if len(specs) == 1 or preprocess is None else spec.family.preprocessing_for(preprocess)
        models.append(ToEmbed(spec, net, weights_id, source, chosen))
    return models


def _embed_sharded(store, models, cohort: str, shard: Optional[str], commit_shards: Optional[int], force: bool,
                   device: str, batch_size: int, workers: int, prompts: list[str], chunk_images: int, quiet: bool,
                   amp: str):
    """``embed --shard I/N`` (one shard's fragments) or ``embed --commit-shards N`` (their one commit)."""
    from embedkit.shard import Shard, ShardError, commit_shards as commit, embed_shard

    if shard is not None and commit_shards is not None:
        raise ShardError("--shard embeds one shard and --commit-shards commits them all: give one of the two")
    if len(models) > 1 or force:
        raise ShardError("a sharded pass embeds one model and resumes (no --force): name one --model")
    if commit_shards is not None:
        if commit_shards < 1:
            raise ShardError(f"--commit-shards must be the number of shards (1 or more), not {commit_shards}")
        return commit(store, models[0], cohort, commit_shards, device=device, extra_prompt_sets=prompts, amp=amp)
    return embed_shard(store, models[0], cohort, Shard.parse(shard), device=device, batch_size=batch_size,
                       workers=workers, chunk_images=chunk_images, progress=not quiet, amp=amp)


def _embed_model_names(model: str, random_init: bool, weights_dir: Optional[Path]) -> list[str]:
    """``--model``: one name, several comma-separated, or ``all`` (the models whose weights are found; with
    --random-init, every tiny model)."""
    from embedkit.models.registry import MODELS

    if model.strip() != "all":
        names = [name.strip() for name in model.split(",") if name.strip()]
        if len(set(names)) != len(names):
            raise typer.BadParameter(f"--model names a model twice ({', '.join(names)})")
        return names
    if random_init:
        return [name for name, spec in MODELS.items() if spec.tiny]
    found = [name for name, spec in MODELS.items() if not spec.tiny and spec.locate_weights(None, weights_dir)[0]]
    if not found:
        raise typer.BadParameter("--model all: no model's weights are found (`embedkit models` says where it looks); "
                                 "pass --random-init for every tiny model")
    return found


# ---- finetune -------------------------------------------------------------------------------------------------

# Options that decide a run's result: with --resume they come from the run's checkpoint, never from the command line.
_FINETUNE_FIXED_ON_RESUME = ("cohort", "weights", "weights_dir", "random_init", "seed_init", "lora_preset", "rank",
                             "alpha", "targets", "epochs", "lr", "wd", "batch_size", "seed", "schedule", "early_stopping",
                             "augment", "amp", "preprocess")


_FINETUNE = partial(LibraryDefault, "embedkit.finetune.train", "FinetuneConfig")


@app.command("finetune")
def finetune_cmd(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, help="Model name (see `embedkit models`); not needed with --resume"),
    method: Optional[FinetuneMethod] = typer.Option(None, help="lora: adapters on the frozen image tower; ft: every "
                                                          "tower weight"),
    cohort: str = typer.Option(_FINETUNE("cohort"), help="Cohort in the store (train/val/test splits)"),
    weights: Optional[Path] = typer.Option(None, help="Weights file or folder in the authors' format"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="EMBEDKIT_WEIGHTS", help="Folder with one sub-folder per model"),
    random_init: bool = typer.Option(False, help="Real architecture, random weights (labelled random-init in the store)"),
    seed_init: int = typer.Option(_FINETUNE("seed_init"), help="Seed of --random-init"),
    lora_preset: LoraPreset = typer.Option(_FINETUNE("lora_preset"),
                                           help="study: the study's LoRA (attention input projections or ResNet "
                                                "bottlenecks, B A unscaled, raw features into the head); embedkit: "
                                                "attention, MLP, alpha 1, unit features"),
    rank: Optional[int] = typer.Option(None, help="LoRA rank (default: the model's, 16 for ViT/Swin, 4 for ResNet)"),
    alpha: Optional[float] = typer.Option(None, help="peft's LoRA alpha (default: the preset's; study: the rank, "
                                                     "embedkit: 1)"),
    targets: Optional[str] = typer.Option(None, help="LoRA targets inside each block, comma-separated (e.g. attn.in_proj,mlp.c_fc); default: the preset's"),
    epochs: int = typer.Option(_FINETUNE("epochs"), help="Epochs"),
    lr: float = typer.Option(_FINETUNE("lr"), help="AdamW learning rate"),
    wd: float = typer.Option(_FINETUNE("wd"), help="AdamW weight decay"),
    batch_size: int = typer.Option(_FINETUNE("batch_size"), help="Images per step"),
    seed: int = typer.Option(_FINETUNE("seed"), help="Seed of the head, LoRA init, shuffles and augmentations"),
    schedule: Schedule = typer.Option(_FINETUNE("schedule"), help="LR schedule, stepped per epoch"),
    early_stopping: int = typer.Option(_FINETUNE("early_stopping"),
                                       help="Stop after N epochs without a lower val loss (0: never)"),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="The paper's flips, rotation and jitter on training images"),
    device: str = typer.Option(_FINETUNE("device"), help="auto | cpu | cuda | cuda:N"),
    amp: Amp = typer.Option(_FINETUNE("amp"), help="none = float32 (as the authors); bf16 | fp16 autocast on CUDA"),
    preprocess: Optional[str] = typer.Option(None, help="study | upstream where a family has both (MedCLIP; default "
                                             "study); recorded in the run's config"),
    workers: int = typer.Option(_FINETUNE("workers"), help="DataLoader worker processes decoding images"),
    pixel_cache: bool = typer.Option(True, "--pixel-cache/--no-pixel-cache",
                                     help="Read the images' pixels from the store's pixel cache, built on first use "
                                          "(the same tensors as decoding the files every epoch)"),
    resume: Optional[str] = typer.Option(None, help="Continue this run from its last completed epoch (its own settings)"),
    stop_after: Optional[int] = typer.Option(None, hidden=True, help="Stop (resumably) after this many epochs"),
    quiet: bool = typer.Option(False, help="No progress output"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary"),
) -> None:
    """LoRA or full fine-tuning of a model's image tower with the LP head; writes a run and its predictions."""
    from embedkit.finetune import train

    store = get_store(ctx)
    if resume:
        # Compared by name: typer ships its own copy of click, whose ParameterSource enum is not click's.
        given = [name for name in _FINETUNE_FIXED_ON_RESUME
                 if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
        if given:
            raise train.FinetuneError(
                f"--resume continues with the settings run '{resume}' started with; drop "
                + ", ".join("--" + g.replace("_", "-") for g in given))
        saved = train.resumable_config(store, resume)
        for name, value in (("model", model), ("method", method and method.value)):
            if value is not None and value != getattr(saved, name):
                raise train.FinetuneError(f"run '{resume}' is --{name} {getattr(saved, name)}, not {value}")
        result = train.resume(store, resume, device=device, workers=workers, progress=not quiet,
                              stop_after=stop_after, pixel_cache=pixel_cache)
    else:
        if model is None or method is None:
            raise typer.BadParameter("--model and --method are needed (or --resume RUN)")
        config = train.FinetuneConfig(
            model=model, method=method.value, cohort=cohort, weights=str(weights) if weights else None,
            weights_dir=str(weights_dir) if weights_dir else None, random_init=random_init, seed_init=seed_init,
            lora_preset=lora_preset.value, rank=rank, alpha=alpha, targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
            epochs=epochs, lr=lr, wd=wd, batch_size=batch_size, seed=seed, schedule=schedule.value,
            early_stopping=early_stopping, augment=augment, amp=amp.value, preprocess=preprocess, device=device,
            workers=workers)
        result = train.finetune(store, config, progress=not quiet, stop_after=stop_after, pixel_cache=pixel_cache)
    if as_json:
        echo_json({"run_id": result.run_id, "finished": result.finished, "epochs_done": result.epochs_done,
                   "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                   "trainable_params": result.trainable_params, "metrics": result.metrics,
                   "checkpoint_dir": str(result.checkpoint_dir)})
    else:
        typer.echo(result.line())


# ---- heads ---------------------------------------------------------------------------------------------------

runs_app = typer.Typer(help="Stored runs: list them (filters, --json) or delete one with its predictions.")
app.add_typer(runs_app, name="runs")


def _set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


_HEAD = partial(LibraryDefault, "embedkit.heads.probe", "HeadConfig")


@app.command("zeroshot")
def zeroshot_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Model name (each family scores by its authors' rule: docs/models.md)"),
    cohort: Optional[str] = typer.Option(None, help="Cohort (default: the only one embedded for this model)"),
    weights_id: Optional[str] = typer.Option(None, help="Which weights' vectors (needed when several were embedded)"),
    prompt_set: Optional[str] = typer.Option(None, help="Stored prompt set (default: the model's own)"),
    ensemble: Optional[Ensemble] = typer.Option(None, help="How a class's prompts combine, where the model's rule "
                                                "allows a choice (default: the rule's own)"),
    logit_scale: Optional[float] = typer.Option(None, help="Override the logit scale recorded in the store"),
    allow_partial: bool = typer.Option(False, help="Go on when some cohort rows have no vectors (recorded in the run)"),
    as_json: bool = typer.Option(False, "--json", help="Print the run as JSON"),
    task: Optional[Task] = task_option(),
    threshold_rule: str = threshold_rule_option(),
) -> None:
    """Zero-shot classification of every cohort row off the stored image and prompt vectors; one run.

    Multi-label cohorts: each label's probability is the softmax over its (positive, negative) prompt pair."""
    from embedkit.heads.zeroshot import run_zeroshot

    run = run_zeroshot(get_store(ctx), model, cohort, weights_id, prompt_set, ensemble and ensemble.value,
                       logit_scale,
                       allow_partial=allow_partial, task=task and task.value, threshold_rule=threshold_rule)
    print_run(run, as_json)


def _mitigation(text: Optional[str], by: str):
    """``--mitigate NAME[:k=v]`` with ``--mitigate-by`` as a Mitigation (None without --mitigate)."""
    from embedkit.heads.mitigate import Mitigation

    return Mitigation.parse(text, by) if text else None


_MITIGATE_OPTION = typer.Option(None, "--mitigate", help="In-processing bias mitigation: reweight | resample | "
                                "groupdro[:eta=0.01] | gap-penalty[:lam=1] (docs/mitigation.md)")
_MITIGATE_BY_OPTION = typer.Option("age_group_sex", "--mitigate-by",
                                   help="Groups of --mitigate: sex | age_group | age_group_sex (age group x sex)")


@app.command("probe")
def probe_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Model whose stored vectors to train on"),
    head: Head = typer.Option(_HEAD("head"), help="lp: Linear-Linear; mlp: Linear-BN-ReLU-Linear; logreg: "
                                                  "logistic regression"),
    cohort: Optional[str] = typer.Option(None, help="Cohort (default: the only one embedded for this model)"),
    weights_id: Optional[str] = typer.Option(None, help="Which weights' vectors (needed when several were embedded)"),
    lr: float = typer.Option(_HEAD("lr"), help="AdamW learning rate (lp, mlp)"),
    wd: float = typer.Option(_HEAD("wd"), help="AdamW weight decay (lp, mlp); L2 strength (logreg)"),
    epochs: int = typer.Option(_HEAD("epochs"), help="Epochs (lp, mlp); the best by val loss is kept"),
    batch_size: int = typer.Option(_HEAD("batch_size"), help="Rows per step (lp, mlp)"),
    hidden: int = typer.Option(_HEAD("hidden"), help="Hidden width (lp, mlp)"),
    max_iter: int = typer.Option(_HEAD("max_iter"), help="L-BFGS iterations (logreg)"),
    tol: float = typer.Option(_HEAD("tol"), help="Stop at max |gradient| <= tol (logreg)"),
    seed: int = typer.Option(LibraryDefault("embedkit.heads.probe", "run_probe", "seed"),
                             help="Seed of the initial weights and the shuffles"),
    mitigate: Optional[str] = _MITIGATE_OPTION,
    mitigate_by: str = _MITIGATE_BY_OPTION,
    target: Optional[str] = typer.Option(None, "--target", help="Predict this images column instead of the label "
                                                                "(sex, age_group, view, ...): how much of it the "
                                                                "vectors encode; prints the test AUC [CI]"),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)"),
    allow_partial: bool = typer.Option(False, help="Go on when some cohort rows have no vectors (recorded in the run)"),
    as_json: bool = typer.Option(False, "--json", help="Print the run as JSON"),
    task: Optional[Task] = task_option(),
    threshold_rule: str = threshold_rule_option(),
) -> None:
    """Train one head on the train split's stored vectors (best epoch on val); predictions for every row.

    Multi-label cohorts: one sigmoid per label (BCE), per-label thresholds chosen on val."""
    from embedkit.heads.probe import HeadConfig, run_probe

    _set_threads(threads)
    cfg = HeadConfig(head.value, lr=lr, wd=wd, epochs=epochs, batch_size=batch_size, hidden=hidden,
                     max_iter=max_iter, tol=tol, mitigate=_mitigation(mitigate, mitigate_by))
    store = get_store(ctx)
    run = run_probe(store, model, cfg, seed, cohort, weights_id, allow_partial=allow_partial,
                    task=task and task.value, threshold_rule=threshold_rule, target=target)
    print_run(run, as_json)
    if target and not as_json:
        _print_encoding(store, [run["run_id"]], None, 1000, 0)


def _print_encoding(store, run_ids, model, ci: int, seed: int) -> None:
    from embedkit.heads.attribute import encoding_table, print_encoding_table

    print_encoding_table(encoding_table(store, run_ids, model, ci=ci, seed=seed), ci, seed)


@app.command("encoding")
def encoding_cmd(
    ctx: typer.Context,
    run: Optional[list[str]] = typer.Option(None, "--run", help="Attribute-probe run id (repeat; default: all)"),
    model: Optional[str] = typer.Option(None, "--model", help="Only this model's attribute probes"),
    ci: int = typer.Option(1000, "--ci", help="Bootstrap resamples of patients (0: no intervals)"),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows"),
) -> None:
    """Per model: how well a head recovers each demographic from the vectors (AUC [CI] of `probe --target`)."""
    from embedkit.heads.attribute import encoding_table

    store = get_store(ctx)
    if as_json:
        echo_json(encoding_table(store, run, model, ci=ci, seed=seed))
    else:
        _print_encoding(store, run, model, ci, seed)


_SWEEP = partial(LibraryDefault, "embedkit.heads.sweep", "run_sweep")


@app.command("sweep")
def sweep_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Model whose stored vectors to train on"),
    head: Head = typer.Option(_HEAD("head"), help="The head every configuration trains"),
    grid: str = typer.Option("", help='Values to sweep, e.g. "lr=1e-4,1e-3 wd=0,1e-5,1e-4 hidden=256,1024"'),
    seeds: str = typer.Option("0-9", help="Seeds: 0-9, 0,3,7 or 0-4,10"),
    select: str = typer.Option(_SWEEP("select"),
                               help="val_macro_f1 | val_loss | fair:f1_gap<=B (val split only)"),
    by: str = by_option(_SWEEP("by"), "Groups whose F1 gap fair:f1_gap<=B bounds (the largest over the attributes)."),
    cohort: Optional[str] = typer.Option(None, help="Cohort (default: the only one embedded for this model)"),
    weights_id: Optional[str] = typer.Option(None, help="Which weights' vectors (needed when several were embedded)"),
    lr: float = typer.Option(_HEAD("lr"), help="Learning rate where the grid does not set it"),
    wd: float = typer.Option(_HEAD("wd"), help="Weight decay / L2 strength where the grid does not set it"),
    epochs: int = typer.Option(_HEAD("epochs"), help="Epochs where the grid does not set them"),
    batch_size: int = typer.Option(_HEAD("batch_size"), help="Batch size where the grid does not set it"),
    hidden: int = typer.Option(_HEAD("hidden"), help="Hidden width where the grid does not set it"),
    max_iter: int = typer.Option(_HEAD("max_iter"), help="logreg L-BFGS iterations where the grid does not set them"),
    tol: float = typer.Option(_HEAD("tol"), help="logreg gradient tolerance where the grid does not set it"),
    models_per_slice: str = typer.Option("auto", "--slice",
                                         help="Models trained together per cache-sized slice: auto | all | N"),
    mitigate: Optional[str] = _MITIGATE_OPTION,
    mitigate_by: str = _MITIGATE_BY_OPTION,
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)"),
    quiet: bool = typer.Option(False, help="No progress bar"),
    allow_partial: bool = typer.Option(False, help="Go on when some cohort rows have no vectors (recorded in the run)"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary"),
    task: Optional[Task] = task_option(),
    threshold_rule: str = threshold_rule_option(),
) -> None:
    """Train every grid configuration x seed at once (one batched model), store each as a run, pick on val."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from embedkit.heads.probe import HeadConfig
    from embedkit.heads.sweep import expand, parse_grid, parse_seeds, render_table, run_sweep
    from embedkit.heads.vectors import HeadsError

    _set_threads(threads)
    store = get_store(ctx)
    if models_per_slice not in ("auto", "all") and not models_per_slice.isdigit():
        raise HeadsError(f"--slice must be auto, all or a number, not '{models_per_slice}'")
    per_slice = int(models_per_slice) if models_per_slice.isdigit() else {"all": None, "auto": "auto"}[models_per_slice]
    base = HeadConfig(head.value, lr=lr, wd=wd, epochs=epochs, batch_size=batch_size, hidden=hidden,
                      max_iter=max_iter, tol=tol, mitigate=_mitigation(mitigate, mitigate_by))
    parsed, seed_list, attributes = parse_grid(grid, head.value), parse_seeds(seeds), parse_by(by)
    work = 0 if head is Head.logreg else sum(c.epochs for c in expand(base, parsed)) * len(seed_list)
    columns = [TextColumn(f"sweep {model} {head.value}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("model-epochs"), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=quiet or not work, transient=True) as bar:
        bar_task = bar.add_task("sweep", total=work)
        outcome = run_sweep(store, model, head.value, parsed, seed_list, base, select, attributes, cohort,
                            weights_id, per_slice, progress=lambda n: bar.update(bar_task, advance=n),
                            allow_partial=allow_partial, task=task and task.value, threshold_rule=threshold_rule)
    if as_json:
        echo_json(outcome.to_json())
    else:
        Console().print(render_table(outcome))
        _print_pick_label_auc(outcome)


def _print_pick_label_auc(outcome) -> None:
    """A multi-label sweep's pick: its AUC per label on val and test (mean over its seeds)."""
    if outcome.task != "multilabel" or outcome.pick is None:
        return
    for split, aucs in outcome.summary[outcome.pick]["label_auc_mean"].items():
        typer.echo(f"pick, {split} AUC per label: " + ", ".join(
            f"{label} {'-' if v is None else f'{v:.3f}'}" for label, v in aucs.items()))


@app.command("posthoc")
def posthoc_cmd(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="The source run to correct (a new run is recorded; the source stays)"),
    method: str = typer.Option(..., "--method", help="thresholds (per-group class-score offsets; fairlearn's "
                                                     "ThresholdOptimizer on binary cohorts) | temperature"),
    by: str = typer.Option("sex", "--by", help="The attribute whose groups get their own correction"),
    metric: str = typer.Option("f1", "--metric", help="thresholds: the metric equalised across groups: f1 | tpr "
                                                      "(| eqodds on binary cohorts)"),
    tradeoff: float = typer.Option(1.0, "--tradeoff", help="thresholds: weight of the val gap against val "
                                                           "macro-F1"),
    seed: int = typer.Option(0, "--seed", help="ThresholdOptimizer's random_state"),
    as_json: bool = typer.Option(False, "--json", help="Print the run as JSON"),
) -> None:
    """Per-group post-hoc correction of a run, fitted on its val rows only; recorded as a new derived run."""
    from embedkit.heads.posthoc import run_posthoc

    print_run(run_posthoc(get_store(ctx), run, method, by, metric, tradeoff, seed), as_json)


@runs_app.callback(invoke_without_command=True)
def runs_cmd(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, help="Only runs of this model"),
    method: Optional[Method] = typer.Option(None, help="Only runs of this method"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable listing"),
) -> None:
    """List runs (newest first); `embedkit runs delete RUN_ID` removes one."""
    from embedkit.output import print_runs
    from embedkit.store.runs import list_runs

    if ctx.invoked_subcommand:
        return
    store = get_store(ctx)
    runs = list_runs(store, model, method and method.value)
    if as_json:
        echo_json(runs)
    elif not runs:
        typer.echo("no runs" + (" matching the filters" if model or method else f" in {store.path}"))
    else:
        print_runs(runs, str(store.path))


@runs_app.command("delete")
def runs_delete_cmd(ctx: typer.Context, run_id: str = typer.Argument(..., help="The run to delete")) -> None:
    """Delete a run and its predictions."""
    from embedkit.store.runs import delete_run

    n = delete_run(get_store(ctx), run_id)
    typer.echo(f"deleted run {run_id} and its {n} predictions")


# ---- fairness ----------------------------------------------------------------------------------------------------
# embedkit fairness / sql / export: the DuckDB views over the store (embedkit/sql), bootstrap intervals.


@app.command("fairness")
def fairness_cmd(
    ctx: typer.Context,
    run: Optional[list[str]] = typer.Option(None, "--run", help="Run id (repeat for several)."),
    model: Optional[str] = typer.Option(None, "--model", help="Every run of this model."),
    method: Optional[Method] = typer.Option(None, "--method", help="Every run of this method."),
    split: Split = typer.Option(Split.test, "--split", help="Split the predictions were scored on."),
    by: str = by_option("sex,age_group", "The tables to print, one per attribute."),
    ci: int = typer.Option(1000, "--ci", help="Bootstrap resamples of patients within groups (0: no intervals)."),
    min_n: int = typer.Option(MIN_GROUP_N, "--min-n", help="Flag (†) groups and gaps resting on fewer rows."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of tables."),
) -> None:
    """Paper-style fairness table: accuracy, per-class F1, Var_F1, F1 gap, EqOdds, ECE gap per attribute."""
    from embedkit.fairness import catalogue, db, table

    attributes, split = parse_by(by), split.value
    store = get_store(ctx)
    con = db.connect(store, catalogue.attributes_to_slice(attributes))
    runs = db.scored_runs(store, run, model, method and method.value, split)
    if _multilabel_fairness(store, con, runs, attributes, split, ci, seed, min_n, as_json):
        return
    rows = table.fairness_rows(con, runs, attributes, split, ci, seed, min_n)
    if as_json:
        echo_json({"split": split, "attributes": attributes, "n_resamples": ci, "seed": seed, "min_n": min_n,
                   "runs": runs, "rows": rows})
        return
    table.print_tables(con, rows, runs, attributes, split, ci, seed, min_n)


def _multilabel_fairness(store, con, runs: list[dict], attributes: list[str], split: str, ci: int, seed: int,
                         min_n: int, as_json: bool) -> bool:
    """`embedkit fairness` on multi-label runs (per-label AUC by group, underdiagnosis): prints and returns True;
    returns False for multi-class runs, which the paper-style table shows."""
    from embedkit.fairness import multilabel

    if not multilabel.is_multilabel(store, runs):
        return False
    rows, bca = multilabel.multilabel_rows(con, runs, attributes, split, ci, seed, min_n)
    if as_json:
        echo_json({"task": multilabel.TASK, "split": split, "attributes": attributes, "n_resamples": ci,
                   "seed": seed, "min_n": min_n, "interval": "bca" if bca else "percentile", "runs": runs,
                   "rows": rows})
    else:
        multilabel.print_multilabel(con, rows, runs, attributes, split, ci, seed, min_n, bca)
    return True


@app.command("compare")
def compare_cmd(
    ctx: typer.Context,
    runs: Optional[list[str]] = typer.Argument(None, help="RUN_A RUN_B (B - A is reported); with --matrix, any "
                                                           "number of runs, every pair."),
    matrix: bool = typer.Option(False, "--matrix", help="Every pair of the runs named (or of --model/--method), "
                                                       "p-values Holm-adjusted over the pairs."),
    model: Optional[str] = typer.Option(None, "--model", help="With --matrix: every run of this model."),
    method: Optional[Method] = typer.Option(None, "--method", help="With --matrix: every run of this method."),
    split: Split = typer.Option(Split.test, "--split", help="Split both runs were scored on."),
    by: str = by_option("sex,age_group", "The attributes whose groups and gaps to show (besides the whole split)."),
    ci: int = typer.Option(1000, "--ci", help="Paired bootstrap resamples of patients within groups."),
    level: float = typer.Option(0.95, "--level", help="Confidence level of the intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    auc: bool = typer.Option(False, "--auc", help="Also AUC and classwise ECE (the costly metrics)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of tables."),
) -> None:
    """Paired comparison: the difference B - A of every metric and gap, with a paired bootstrap interval."""
    from embedkit.fairness import catalogue, compare, db

    attributes, split_name = parse_by(by), split.value
    store = get_store(ctx)
    names = list(runs or [])
    if matrix:
        if not names and not (model or method):
            raise typer.BadParameter("--matrix needs run ids, or --model/--method to select runs")
        selected = db.scored_runs(store, names or None, model, method and method.value, split_name)
        pairs = compare.all_pairs([r["run_id"] for r in selected])
        if not pairs:
            raise typer.BadParameter("--matrix needs at least two runs with predictions on the split")
    else:
        if len(names) != 2 or model or method:
            raise typer.BadParameter("name two runs, RUN_A RUN_B (or use --matrix for every pair of several)")
        selected = db.scored_runs(store, names, None, None, split_name)
        pairs = [(names[0], names[1])]
    con = db.connect(store, catalogue.attributes_to_slice(attributes))
    rows = compare.paired_differences(con, pairs, split_name, ci, seed, level, class_scores=auc)
    info = {r["run_id"]: r for r in selected}
    if as_json:
        echo_json({"split": split_name, "pairs": [list(p) for p in pairs], "n_resamples": ci, "seed": seed,
                   "level": level, "correction": "holm over pairs, per metric" if matrix else "none (one pair)",
                   "runs": selected, "rows": rows})
        return
    compare.print_comparison(rows, info, attributes, level, ci, seed, matrix)


_VIEWS_BY = f"The views' attributes (default: {', '.join(DEFAULT_ATTRIBUTES)})."


@app.command("sql")
def sql_cmd(
    ctx: typer.Context,
    query: Optional[str] = typer.Argument(None, help="A DuckDB query; without one, read queries from stdin."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="How results print."),
    by: Optional[str] = by_option(None, _VIEWS_BY),
    allow_read: Optional[list[Path]] = typer.Option(None, "--allow-read",
                                                    help="A file or folder queries may read (repeatable)."),
) -> None:
    """Query the store with DuckDB: every table and fairness view is registered (`.tables` lists them).

    Read-only: no statement writes a file, attaches a database, loads an extension or reaches the network, and
    files outside the store are read only where --allow-read names them.
    """
    from embedkit import sqlshell

    con = sqlshell.connect(get_store(ctx), parse_by(by) or None, allow_read or ())
    if query is None:
        sqlshell.repl(con, fmt, typer.get_text_stream("stdin"))
    elif not sqlshell.answer(con, query, fmt):
        raise typer.Exit(1)


@app.command("doctor")
def doctor_cmd(
    ctx: typer.Context,
    repair: bool = typer.Option(False, "--repair", help="Remove what is found (orphans, duplicates, stale copies)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable findings."),
    drop_table: Optional[str] = typer.Option(None, "--drop-table", metavar="TABLE",
                                             help="Drop this table instead (e.g. emb_<model> of another width)."),
    yes: bool = typer.Option(False, "--yes", help="With --drop-table: drop a core table (images, runs, "
                                                  "predictions, weights, studies) too."),
) -> None:
    """Check the store for what interrupted or racing writers left: orphan predictions, duplicate vectors or runs,
    stale copies of cohort columns. Exit 1 when something is found and not repaired. --drop-table drops a table."""
    from dataclasses import asdict

    from embedkit.store.doctor import examine

    store = get_store(ctx)
    if drop_table:
        dropped = store.drop_table(drop_table, core=yes)
        typer.echo(f"dropped {', '.join(dropped)} from {store.path}")
        return
    findings = examine(store, repair)
    if as_json:
        echo_json([asdict(f) for f in findings])
    else:
        for f in findings:
            typer.echo(f.line())
        if not findings:
            typer.echo(f"{store.path}: no orphans, duplicates or stale copies")
        elif not repair and any(f.repairable for f in findings):
            typer.echo("run `embedkit doctor --repair` to remove "
                       + ("them" if all(f.repairable for f in findings) else "the repairable ones"))
    if any(not f.repaired for f in findings):
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    ctx: typer.Context,
    parquet: Path = typer.Option(..., "--parquet", help="Directory for tables/*.parquet, views/*.parquet, views.sql."),
    by: Optional[str] = by_option(None, _VIEWS_BY),
) -> None:
    """Export the store's non-vector tables and the fairness views as Parquet, with views.sql to rebuild the views."""
    from embedkit.fairness import db

    attributes = parse_by(by) or None
    con = db.connect(get_store(ctx), attributes)
    written = db.export_parquet(con, parquet, attributes)
    for path in written:
        typer.echo(str(path))


# ---- report ------------------------------------------------------------------------------------------------------


_REPORT = partial(LibraryDefault, "embedkit.report.build", "build_report")


@app.command("report")
def report_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("embedkit-report"), "--out", help="Folder for report.html, report.md and the PNGs."),
    run: Optional[list[str]] = typer.Option(None, "--run", help="Run id (repeat for several; default: every run)."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Only runs of this model (repeatable)."),
    method: Optional[list[Method]] = typer.Option(None, "--method", help="Only runs of this method (repeatable)."),
    study: Optional[str] = typer.Option(None, "--study", help="Only runs of this study_id."),
    split: Split = typer.Option(_REPORT("split"), "--split", help="Split the metrics are computed on."),
    ci: int = typer.Option(_REPORT("ci"), "--ci",
                           help="Bootstrap resamples of patients within groups (0: no intervals)."),
    by: str = by_option(_REPORT("by"), "The report's tables and figures, one per attribute."),
    seed: int = typer.Option(_REPORT("seed"), "--seed", help="Seed of the bootstrap draws."),
    min_n: int = typer.Option(_REPORT("min_n"), "--min-n", help="Flag (†) groups and gaps resting on fewer rows."),
    title: str = typer.Option(_REPORT("title"), "--title", help="Title of the report."),
) -> None:
    """An HTML report (self-contained: figures inlined, mail it as one file) and report.md with PNGs beside it."""
    import time

    from embedkit.report import build_report

    if ci < 0:
        raise typer.BadParameter("--ci is a number of resamples: 0 (no intervals) or more")
    attributes = parse_by(by)
    start = time.perf_counter()
    html_path = build_report(get_store(ctx), out, runs=run or None, study=study, split=split.value, ci=ci,
                             by=attributes, seed=seed, models=model or None,
                             methods=[m.value for m in method or ()] or None, min_n=min_n, title=title)
    typer.echo(f"report written in {time.perf_counter() - start:.1f} s: {html_path} "
               f"(Markdown: {html_path.with_name('report.md')})")


# ---- demo ------------------------------------------------------------------------------------------------------


_DEMO = partial(LibraryDefault, "embedkit.demo", "run_demo")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo-out"), help="Folder for the demo's store, images and report"),
    models: str = typer.Option(_DEMO("models"), help="Models to embed (comma-separated)"),
    bias: str = typer.Option(_DEMO("bias"), help="Planted unfairness of the synthetic cohort ('' for none)"),
    ci: int = typer.Option(_DEMO("ci"), help="Bootstrap resamples for the intervals"),
    epochs: int = typer.Option(_DEMO("epochs"), help="Probe epochs (the paper's 100)"),
) -> None:
    """The embedded default end to end, no downloads: synthetic X-rays, tiny models, heads, fairness, report."""
    import shlex
    import time

    from embedkit.demo import run_demo

    start = time.perf_counter()
    result = run_demo(out, models=tuple(m.strip() for m in models.split(",") if m.strip()), bias=bias or None,
                      ci=ci, epochs=epochs)
    typer.echo(f"demo finished in {time.perf_counter() - start:.0f} s")
    typer.echo("the report (open it in a browser; report.md beside it):")
    typer.echo(f"  {result.report}")
    # Last: the command that points every verb of the tour (data info, runs, fairness, sql, ...) at the demo's store.
    typer.echo("to go on with the demo's store (embedkit data info, runs, fairness, sql ...):")
    typer.echo(f"export {STORE_ENV}={shlex.quote(str(result.store.path.resolve()))}")


# ---- study -------------------------------------------------------------------------------------------------------


@app.command("study")
def study_cmd(
    ctx: typer.Context,
    name: Optional[str] = typer.Option(None, help="Study name = its study_id (default: study); re-run it to resume or grow it"),
    models: Optional[str] = typer.Option(None, help="Comma-separated (default: clip,biomedclip,medclip-rn50,medclip-vit,gloria)"),
    methods: Optional[str] = typer.Option(None, help="Comma-separated regimes (default: zeroshot,lp,mlp,lora,ft)"),
    cohort: Optional[str] = typer.Option(None, help="Cohort (default: nih6x200; nih6x200-paper, synthetic or an imported one)"),
    seeds: Optional[str] = typer.Option(None, help="Seeds of lp, mlp, lora, ft: 77,78,79 (default) or a range 77-79"),
    weights_dir: Optional[Path] = typer.Option(None, help="Folder with one sub-folder per model (default: $EMBEDKIT_WEIGHTS)"),
    random_init: Optional[bool] = typer.Option(None, "--random-init/--released-weights", help="Real architectures, random weights (labelled random-init)"),
    device: Optional[str] = typer.Option(None, help="auto (default) | cpu | cuda"),
    cpu_ok: Optional[bool] = typer.Option(None, "--cpu-ok/--no-cpu-ok", help="Run lora and ft even without a GPU (else skipped)"),
    plan: bool = typer.Option(False, "--plan", help="Print the steps (done / to do / skipped) and time estimates; run nothing"),
    file: Optional[Path] = typer.Option(None, "--file", help="Study file (.yaml/.toml) with the same keys; flags override it"),
    probe_epochs: Optional[int] = typer.Option(None, help="Epochs of the lp and mlp heads (default: 100)"),
    ft_epochs: Optional[int] = typer.Option(None, help="Epochs of lora and ft (default: 100)"),
    images: Optional[Path] = typer.Option(None, help="Folder of the NIH PNGs, to import nih6x200[-paper] if the store lacks it"),
    report: Optional[Path] = typer.Option(None, help="Report folder (default: <store>/../study-<name>)"),
    ci: Optional[int] = typer.Option(None, help="Bootstrap resamples of the report's intervals (default: 1000)"),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers decoding images (default: 2)"),
    amp: Optional[str] = typer.Option(None, help="Precision of the image passes: none = fp32 (default, as the "
                                      "authors) | bf16 | fp16 (autocast, CUDA only)"),
    preprocess: Optional[str] = typer.Option(None, help="study (default) | upstream: MedCLIP's two preprocessings; "
                                             "the other families have one"),
    stop_after: Optional[int] = typer.Option(None, hidden=True, help="Stop (resumably) after this many steps"),
    quiet: bool = typer.Option(False, help="No progress output"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable plan / result"),
    executor: str = typer.Option("local", help="local (default: the steps in this process) | ray (each step a Ray "
                                 "task; pip install 'embedkit[ray]'; docs/scaleout.md)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join with --executor ray (auto, "
                                          "ray://HOST:10001; default: $RAY_ADDRESS, else a local one)"),
) -> None:
    """The paper's whole matrix (models x regimes x seeds), resumable, ending in its report."""
    from embedkit.study import make_config, plan_lines, run_study

    config = make_config(file, name=name, models=models, methods=methods, cohort=cohort, seeds=seeds,
                         weights_dir=weights_dir, random_init=random_init, device=device, cpu_ok=cpu_ok,
                         probe_epochs=probe_epochs, ft_epochs=ft_epochs, images=images, report=report, ci=ci,
                         workers=workers, amp=amp, preprocess=preprocess)
    result = run_study(get_store(ctx, create=True), config, plan_only=plan, progress=not quiet and not as_json,
                       stop_after=stop_after, executor=executor, address=address)
    if as_json:
        echo_json(result.to_json())
    elif plan:
        for line in plan_lines(result):
            typer.echo(line)
    elif result.stopped:
        typer.echo(f"study '{config.name}': stopped after {len(result.run)} steps; "
                   f"{len(result.todo)} to do (run the same command again to continue)")
    else:
        skipped = f", {len(result.skipped)} skipped (lora/ft need a GPU or --cpu-ok)" if result.skipped else ""
        typer.echo(f"study '{config.name}': {len(result.run)} steps run, {len(result.done) - len(result.run)} "
                   f"already done{skipped}; report: {result.report or 'none (no runs)'}")


if __name__ == "__main__":
    main()
