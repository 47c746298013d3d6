"""The `embedkit` command line. Commands are thin: they parse options and call the library.

Heavy libraries (torch, open_clip, lancedb, ...) are imported inside commands so `embedkit --help` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from embedkit import __version__
from embedkit.constants import STORE_ENV
from embedkit.errors import EmbedkitError

app = typer.Typer(
    help="Fairness audits of CLIP-style medical vision-language models, around an embedding store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Cohorts: NIH protocols, manifest import, synthetic X-rays, counts.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"embedkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    store: Optional[Path] = typer.Option(
        None, "--store", envvar=STORE_ENV, help="Store directory (LanceDB). Default: ./embedkit-store"
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    ctx.obj = {"store": store}


def get_store(ctx: typer.Context):
    """The Store named by the global --store option (or $EMBEDKIT_STORE, or ./embedkit-store)."""
    from embedkit.store.store import Store

    return Store(ctx.obj["store"] if ctx.obj else None)


def echo_json(obj) -> None:
    import json

    typer.echo(json.dumps(obj, indent=2, default=str))


def main() -> None:
    """Console entry point: user-fixable errors print one message and exit 1 (no traceback)."""
    try:
        app()
    except EmbedkitError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)


# ---- data ------------------------------------------------------------------------------------------------------

NIH_PROTOCOLS = ("nih6x200", "nih6x200-paper", "nih")


def _import_rows(ctx, frame, cohort: str, images, classes, allow_repeats: bool, verify: bool, skip_bad: bool,
                 manifest_out: Optional[Path]) -> None:
    """Validate, optionally write the manifest, and import; prints one summary line."""
    from embedkit.data.cohort import import_cohort, validate_cohort, write_manifest

    validated = validate_cohort(frame, cohort, images_dir=images, classes=classes, allow_repeats=allow_repeats,
                                verify_images=verify)
    result = import_cohort(get_store(ctx), validated, cohort, skip_bad=skip_bad)
    if manifest_out:
        write_manifest(validated.rows, manifest_out)
        typer.echo(f"manifest written: {manifest_out}")
    rejected = f", {result.rejected} rejected (see the rejects table)" if result.rejected else ""
    typer.echo(f"cohort '{cohort}': {result.imported} rows imported into {get_store(ctx).path}{rejected}")


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
) -> None:
    """NIH ChestX-ray14 cohorts: the paper's 6x200 (exact, leaks), a clean 6x200, or all 112,120 images."""
    from embedkit.constants import NIH_CLASSES
    from embedkit.data import nih

    if protocol not in NIH_PROTOCOLS:
        raise typer.BadParameter(f"unknown protocol '{protocol}'; choose one of {', '.join(NIH_PROTOCOLS)}")
    if metadata is not None:
        meta = nih.read_metadata(metadata)
        frame = {"nih6x200-paper": nih.paper_cohort, "nih6x200": nih.clean_cohort, "nih": nih.full_cohort}[protocol](meta)
    elif protocol == "nih":
        raise typer.BadParameter("--protocol nih needs --metadata Data_Entry_2017_v2020.csv[.gz]")
    else:
        frame = nih.shipped_manifest(protocol)
    if images is None and verify:
        raise typer.BadParameter("--images DIR is needed to verify the images (or pass --no-verify)")
    if protocol == "nih6x200-paper":
        leaks = nih.leak_report(frame)
        typer.secho("WARNING: nih6x200-paper reproduces the study's cohort, which leaks: "
                    + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in leaks.items()), fg=typer.colors.YELLOW, err=True)
    classes = None if protocol == "nih" else NIH_CLASSES
    _import_rows(ctx, frame, cohort or protocol, images, classes, protocol == "nih6x200-paper", verify, skip_bad,
                 manifest_out)


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
) -> None:
    """Import any other dataset (CheXpert-, MIMIC-, PadChest-style CSV) mapped onto embedkit's fields."""
    from embedkit.data.cohort import parse_mapping, read_manifest

    frame = read_manifest(manifest, parse_mapping(map_))
    allowed = tuple(c.strip() for c in classes.split(",")) if classes else None
    _import_rows(ctx, frame, cohort, images, allowed, False, verify, skip_bad, manifest_out)


@data_app.command("synth")
def data_synth(
    ctx: typer.Context,
    out: Path = typer.Option(..., help="Folder for the PNGs"),
    cohort: str = typer.Option("nih6x200", help="Manifest to synthesise: nih6x200, nih6x200-paper or a CSV path"),
    name: str = typer.Option("synthetic", help="Cohort name in the store"),
    size: int = typer.Option(256, help="Image side in pixels"),
    seed: int = typer.Option(0, help="Seed (same seed, same bytes)"),
    bias: Optional[str] = typer.Option(None, help="Planted unfairness, e.g. 'sex=F:signal=0.3' or 'age_group=old:label_noise=0.4'"),
    manifest_out: Optional[Path] = typer.Option(None, help="Also write the cohort as CSV here"),
) -> None:
    """Synthetic chest X-rays for every row of a manifest (real ages and sexes), imported as a cohort."""
    import time

    from embedkit.data import nih, synth
    from embedkit.data.cohort import read_manifest

    spec = synth.parse_bias(bias) if bias else None
    frame = nih.shipped_manifest(cohort) if cohort in ("nih6x200", "nih6x200-paper") else read_manifest(cohort)
    start = time.perf_counter()
    written = synth.synthesize(frame, out, size=size, seed=seed, bias=spec)
    seconds = time.perf_counter() - start
    typer.echo(f"{len(written)} synthetic images written to {out} in {seconds:.1f} s"
               + (f" (bias: {spec})" if spec else ""))
    frame = frame.merge(written[["image_id", "biased"]], on="image_id", how="left")
    frame["bias"] = str(spec) if spec else None
    _import_rows(ctx, frame, name, out, None, frame["image_id"].duplicated().any(), True, False, manifest_out)


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
        report[name] = {"rows": len(rows), "problems": problems,
                        "counts": {" / ".join(map(str, k)): v for k, v in counts.stack(["age_group", "sex"]).items()}}
        if not as_json:
            typer.echo(f"cohort '{name}': {len(rows)} rows")
            typer.echo(counts.to_string())
            typer.echo("problems: " + ("; ".join(problems) if problems else "none found"))
    if as_json:
        echo_json(report)


# ---- models and embedding --------------------------------------------------------------------------------------


@app.command("models")
def models_cmd(
    weights_dir: Optional[Path] = typer.Option(None, envvar="EMBEDKIT_WEIGHTS", help="Folder with one sub-folder per model"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Each model: embedding width, the files it needs, where users get them, and whether they are here."""
    from embedkit.models.registry import MODELS

    listing = []
    for spec in MODELS.values():
        found = None if spec.tiny else spec.find_weights(weights_dir)
        listing.append({"model": spec.name, "embed_dim": spec.embed_dim, "description": spec.description,
                        "files": [] if spec.tiny else list(spec.weight_files),
                        "source": "random init only (test configuration)" if spec.tiny else spec.weight_source,
                        "found": str(found) if found else None})
    if as_json:
        echo_json(listing)
        return
    for item in listing:
        status = f"found: {item['found']}" if item["found"] else ("random init only" if not item["files"] else "not found")
        typer.echo(f"{item['model']:<20} dim {item['embed_dim']:<4} {status}")
        if item["files"]:
            typer.echo(f"{'':<20} needs {', '.join(item['files'])}; from {item['source']}")


@app.command("embed")
def embed_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Model name (see `embedkit models`)"),
    cohort: str = typer.Option("nih6x200", help="Cohort in the store"),
    weights: Optional[Path] = typer.Option(None, help="Weights file or folder in the authors' format"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="EMBEDKIT_WEIGHTS", help="Folder with one sub-folder per model"),
    random_init: bool = typer.Option(False, help="Real architecture, random weights (labelled random-init in the store)"),
    seed: int = typer.Option(0, help="Seed of --random-init"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(64, help="Images per forward pass"),
    workers: int = typer.Option(2, help="DataLoader worker processes decoding images"),
    prompts: list[str] = typer.Option([], help="Extra prompt set: a YAML/JSON file {class: [prompts]} (repeatable)"),
    force: bool = typer.Option(False, help="Re-embed rows already embedded with these weights"),
    chunk_images: int = typer.Option(256, help="Images per store commit (a killed run loses at most one chunk)"),
    quiet: bool = typer.Option(False, help="No progress bar"),
) -> None:
    """Embed a cohort's images and its class prompts with one model into the store."""
    from embedkit.embed import embed_cohort
    from embedkit.models.registry import get_spec, instantiate

    if weights and random_init:
        raise typer.BadParameter("--weights and --random-init exclude each other")
    spec = get_spec(model)
    net, weights_id, source = instantiate(spec, weights, random_init, seed, weights_dir)
    summary = embed_cohort(get_store(ctx), spec, net, weights_id, source, cohort, device=device,
                           batch_size=batch_size, workers=workers, force=force, extra_prompt_sets=prompts,
                           chunk_images=chunk_images, progress=not quiet)
    typer.echo(summary.line())


# ---- finetune -------------------------------------------------------------------------------------------------

# Options that decide a run's result: with --resume they come from the run's checkpoint, never from the command line.
_FINETUNE_FIXED_ON_RESUME = ("cohort", "weights", "weights_dir", "random_init", "seed_init", "rank", "alpha",
                             "targets", "epochs", "lr", "wd", "batch_size", "seed", "schedule", "early_stopping",
                             "augment", "amp")


@app.command("finetune")
def finetune_cmd(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, help="Model name (see `embedkit models`); not needed with --resume"),
    method: Optional[str] = typer.Option(None, help="lora (adapters on the frozen image tower) | ft (every tower weight)"),
    cohort: str = typer.Option("nih6x200", help="Cohort in the store (train/val/test splits)"),
    weights: Optional[Path] = typer.Option(None, help="Weights file or folder in the authors' format"),
    weights_dir: Optional[Path] = typer.Option(None, envvar="EMBEDKIT_WEIGHTS", help="Folder with one sub-folder per model"),
    random_init: bool = typer.Option(False, help="Real architecture, random weights (labelled random-init in the store)"),
    seed_init: int = typer.Option(0, help="Seed of --random-init"),
    rank: Optional[int] = typer.Option(None, help="LoRA rank (default: the model's, 16 for ViT/Swin, 4 for ResNet)"),
    alpha: float = typer.Option(1.0, help="LoRA alpha (the paper's 1)"),
    targets: Optional[str] = typer.Option(None, help="LoRA targets inside each block, comma-separated (e.g. attn,mlp.c_fc); default per tower"),
    epochs: int = typer.Option(100, help="Epochs"),
    lr: float = typer.Option(1e-4, help="AdamW learning rate"),
    wd: float = typer.Option(1e-5, help="AdamW weight decay"),
    batch_size: int = typer.Option(64, help="Images per step"),
    seed: int = typer.Option(77, help="Seed of the head, LoRA init, shuffles and augmentations"),
    schedule: str = typer.Option("cosine", help="LR schedule, stepped per epoch: cosine | step | constant"),
    early_stopping: int = typer.Option(0, help="Stop after N epochs without a lower val loss (0: never)"),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="The paper's flips, rotation and jitter on training images"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    amp: str = typer.Option("bf16", help="Autocast on CUDA: bf16 | fp16 | none (CPU runs float32)"),
    workers: int = typer.Option(2, help="DataLoader worker processes decoding images"),
    resume: Optional[str] = typer.Option(None, help="Continue this run from its last completed epoch (its own settings)"),
    stop_after: Optional[int] = typer.Option(None, hidden=True, help="Stop (resumably) after this many epochs"),
    quiet: bool = typer.Option(False, help="No progress output"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary"),
) -> None:
    """LoRA or full fine-tuning of a model's image tower with the LP head; writes a run and its predictions."""
    from click.core import ParameterSource

    from embedkit.finetune import train

    store = get_store(ctx)
    if resume:
        given = [name for name in _FINETUNE_FIXED_ON_RESUME
                 if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
        if given:
            raise train.FinetuneError(
                f"--resume continues with the settings run '{resume}' started with; drop "
                + ", ".join("--" + g.replace("_", "-") for g in given))
        saved = train.resumable_config(store, resume)
        for name, value in (("model", model), ("method", method)):
            if value is not None and value != getattr(saved, name):
                raise train.FinetuneError(f"run '{resume}' is --{name} {getattr(saved, name)}, not {value}")
        result = train.resume(store, resume, device=device, workers=workers, progress=not quiet,
                              stop_after=stop_after)
    else:
        if model is None or method is None:
            raise typer.BadParameter("--model and --method are needed (or --resume RUN)")
        config = train.FinetuneConfig(
            model=model, method=method, cohort=cohort, weights=str(weights) if weights else None,
            weights_dir=str(weights_dir) if weights_dir else None, random_init=random_init, seed_init=seed_init,
            rank=rank, alpha=alpha, targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
            epochs=epochs, lr=lr, wd=wd, batch_size=batch_size, seed=seed, schedule=schedule,
            early_stopping=early_stopping, augment=augment, amp=amp, device=device, workers=workers)
        result = train.finetune(store, config, progress=not quiet, stop_after=stop_after)
    if as_json:
        echo_json({"run_id": result.run_id, "finished": result.finished, "epochs_done": result.epochs_done,
                   "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                   "trainable_params": result.trainable_params, "metrics": result.metrics,
                   "checkpoint_dir": str(result.checkpoint_dir)})
    else:
        typer.echo(result.line())


if __name__ == "__main__":
    main()
