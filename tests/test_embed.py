"""The embedding pass: one row per image and weights_id, resumable after a kill, clear errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.data.cohort import CohortError, import_cohort, validate_cohort
from embedkit.data.images import ImageDecodeError
from embedkit.embed import embed_cohort
from embedkit.models.registry import UnknownModelError, get_spec, instantiate
from embedkit.store import schemas
from embedkit.store.store import StoreError


def _import(store, frame, folder, name="c", allow_repeats=False):
    import_cohort(store, validate_cohort(frame, name, images_dir=folder, allow_repeats=allow_repeats), name)


def _embed(store, model="tiny-clip", cohort="c", **kw):
    spec = get_spec(model)
    net, weights_id, source = instantiate(spec, random_init=True, seed=kw.pop("seed", 0))
    return embed_cohort(store, spec, net, weights_id, source, cohort, device="cpu", batch_size=8, workers=0,
                        progress=False, **kw)


def test_embed_writes_one_normalised_vector_per_row_and_the_prompts(store, small_cohort):
    frame, folder = small_cohort
    _import(store, frame, folder)
    summary = _embed(store)
    assert (summary.rows, summary.skipped, summary.weights_id) == (len(frame), 0, "random-init:tiny-clip:0")
    table = store.read("emb_tiny_clip").to_pandas()
    assert len(table) == len(frame) and table["row_id"].is_unique
    vectors = np.stack(table["vector"].to_numpy())
    assert vectors.shape == (len(frame), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # one copy of each fact: labels, splits and demographics stay in `images`, joined by row_id
    assert set(table.columns) == {"row_id", "cohort", "image_id", "model", "weights_id", "vector"}
    assert set(table["row_id"]) == set(store.read("images")["row_id"].to_pylist())
    prompts = store.read("prompts_tiny_clip").to_pandas()
    assert set(prompts["prompt_set"]) == {"clip", "biomedclip-authors"}  # the family's sets
    for _, one_set in prompts.groupby("prompt_set"):
        assert one_set["prompt_index"].tolist() == list(range(len(one_set)))
    weights = store.read("weights").to_pylist()
    assert weights[0]["weights_id"] == "random-init:tiny-clip:0" and weights[0]["embed_dim"] == 32


def test_second_run_skips_done_rows_and_another_seed_is_kept_apart(store, small_cohort):
    frame, folder = small_cohort
    _import(store, frame, folder)
    _embed(store)
    again = _embed(store)
    assert (again.images, again.skipped) == (0, len(frame))
    _embed(store, seed=1)
    counts = store.read("emb_tiny_clip").to_pandas().groupby("weights_id").size().to_dict()
    assert counts == {"random-init:tiny-clip:0": len(frame), "random-init:tiny-clip:1": len(frame)}


def test_repeated_images_share_one_forward_pass_and_keep_their_rows(store, small_cohort):
    frame, folder = small_cohort
    doubled = frame.copy()
    doubled.loc[len(doubled)] = {**doubled.iloc[0].to_dict(), "split": "test"}
    _import(store, doubled, folder, allow_repeats=True)
    summary = _embed(store)
    assert (summary.images, summary.rows) == (len(frame), len(doubled))
    table = store.read("emb_tiny_clip").to_pandas().set_index("row_id")
    first = doubled.iloc[0]["image_id"]
    np.testing.assert_array_equal(table.loc[f"c/{first}", "vector"], table.loc[f"c/{first}#1", "vector"])
    images = store.read("images").to_pandas().set_index("row_id")
    assert images.loc[f"c/{first}#1", "split"] == "test"


def test_gloria_stores_local_similarities_per_prompt(store, small_cohort):
    frame, folder = small_cohort
    _import(store, frame, folder)
    _embed(store, model="tiny-gloria")
    local = store.read("localsim_tiny_gloria").to_pandas()
    prompts = store.read("prompts_tiny_gloria").to_pandas()
    assert sorted(local["prompt_set"].unique()) == ["chexpert-gloria", "chexpert-nih"]  # GLoRIA embeds its own draw
    assert len(local) == 2 * len(frame)
    # Stored verbatim, spaces and all: GLoRIA's zero-shot counts the raw prompt's characters.
    gloria_prompts = prompts.loc[prompts["prompt_set"] == "chexpert-gloria", "prompt"].tolist()
    assert " tiny bilateral pleural effusion" in gloria_prompts
    for name, group in prompts.groupby("prompt_set"):
        assert {len(s) for s in local.loc[local["prompt_set"] == name, "similarity"]} == {len(group)}


def test_a_changed_prompt_set_is_re_embedded_and_stale_local_similarities_are_refused(store, small_cohort, tmp_path):
    frame, folder = small_cohort
    _import(store, frame, folder)
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({c: [f"an x-ray of {c}"] for c in sorted(frame["label"].unique())}))
    _embed(store, extra_prompt_sets=[str(mine)])
    mine.write_text(json.dumps({c: [f"a radiograph of {c}"] for c in sorted(frame["label"].unique())}))
    _embed(store, extra_prompt_sets=[str(mine)])  # as many prompts as before, other strings: embedded again
    stored = store.read("prompts_tiny_clip", "prompt_set = 'mine'").to_pandas()
    assert len(stored) == 6 and stored["prompt"].str.startswith("a radiograph of").all()

    _embed(store, model="tiny-gloria", extra_prompt_sets=[str(mine)])
    before = store.read("localsim_tiny_gloria").num_rows, store.read("prompts_tiny_gloria").to_pandas()
    mine.write_text(json.dumps({c: [f"no sign of {c}"] for c in sorted(frame["label"].unique())}))
    with pytest.raises(CohortError, match="mine differ.*--force"):  # the images' similarities are to the old ones
        _embed(store, model="tiny-gloria", extra_prompt_sets=[str(mine)])
    assert store.read("localsim_tiny_gloria").num_rows == before[0]
    assert store.read("prompts_tiny_gloria").to_pandas()["prompt"].tolist() == before[1]["prompt"].tolist()
    _embed(store, model="tiny-gloria", extra_prompt_sets=[str(mine)], force=True)
    local = store.read("localsim_tiny_gloria", "prompt_set = 'mine'").num_rows
    assert local == len(frame)


def test_width_mismatch_unknown_model_and_unknown_cohort_are_clear_errors(store, small_cohort):
    frame, folder = small_cohort
    _import(store, frame, folder)
    store.db.create_table("emb_tiny_clip", schema=schemas.embeddings_schema(8))
    with pytest.raises(StoreError, match="width 8, but these vectors have width 32"):
        _embed(store)
    with pytest.raises(UnknownModelError, match=r"unknown model 'nope' \(known models: clip, biomedclip"):
        get_spec("nope")
    with pytest.raises(CohortError, match="no cohort 'other'"):
        _embed(store, model="tiny-medclip-vit", cohort="other")


def test_a_corrupt_image_stops_the_pass_with_its_name_and_keeps_earlier_chunks(store, small_cohort):
    frame, folder = small_cohort
    _import(store, frame, folder)
    broken = sorted(folder.iterdir())[-1]
    broken.write_bytes(b"corrupted after import")
    with pytest.raises(ImageDecodeError, match=broken.name):
        _embed(store, chunk_images=8)
    assert 0 < store.count("emb_tiny_clip") < len(frame)


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_one_row_per_image(tmp_path):
    from conftest import write_cohort_images

    folder = tmp_path / "images"
    frame = write_cohort_images(folder, n_per_class=10)
    store_dir = tmp_path / "killed"
    runner = CliRunner()
    manifest = tmp_path / "m.csv"
    frame.to_csv(manifest, index=False)
    assert runner.invoke(app, ["--store", str(store_dir), "data", "import", str(manifest), "--images", str(folder),
                               "--cohort", "c"]).exit_code == 0
    cmd = [sys.executable, "-m", "embedkit.cli", "--store", str(store_dir), "embed", "--model", "tiny-clip",
           "--random-init", "--cohort", "c", "--workers", "0", "--batch-size", "2", "--chunk-images", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    from embedkit.store.store import Store

    deadline = time.time() + 120
    # Kill as soon as the first chunk is committed: ~30 commits of 2 images remain to interrupt.
    while time.time() < deadline and Store(store_dir).count("emb_tiny_clip") == 0:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Store(store_dir).count("emb_tiny_clip")
    assert 0 < partial < len(frame), "the kill should land mid-run"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(frame) - partial} rows, {partial} already there" in done.stdout
    rows = Store(store_dir).read("emb_tiny_clip").to_pandas()
    assert len(rows) == len(frame) and rows["row_id"].is_unique


def test_sql_counts_embeddings_before_any_run(tmp_path, small_cohort):
    frame, folder = small_cohort
    store_dir = str(tmp_path / "s")
    manifest = tmp_path / "m.csv"
    frame.to_csv(manifest, index=False)
    runner = CliRunner()
    for args in (["data", "import", str(manifest), "--images", str(folder), "--cohort", "c"],
                 ["embed", "--model", "tiny-clip", "--random-init", "--cohort", "c", "--workers", "0", "--quiet"]):
        assert runner.invoke(app, ["--store", store_dir, *args]).exit_code == 0
    result = runner.invoke(app, ["--store", store_dir, "sql", "--format", "csv",
                                 "SELECT count(*) AS n, count(DISTINCT row_id) AS d FROM emb_tiny_clip"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"{len(frame)},{len(frame)}"


def test_a_second_pass_of_the_same_slice_is_refused_while_one_runs(store, small_cohort):
    """Two passes would both append every row; the second is refused with the holder named, and writes nothing."""
    from embedkit.store.store import StoreBusy

    frame, folder = small_cohort
    _import(store, frame, folder)
    spec = get_spec("tiny-clip")
    net, weights_id, _ = instantiate(spec, random_init=True, seed=0)
    with store.embedding_lock("tiny-clip", weights_id, "c"):
        with pytest.raises(StoreBusy, match=r"pid \d+ \(an embedding pass of tiny-clip on cohort 'c'"):
            _embed(store)
        assert not store.has("emb_tiny_clip")
        _embed(store, seed=1)  # other weights: another slice, not blocked
    assert _embed(store).rows == len(frame) and store.count("emb_tiny_clip") == 2 * len(frame)


def test_heads_use_the_current_splits_and_refuse_an_unfinished_pass(store, small_cohort):
    from embedkit.heads.probe import HeadConfig, run_probe
    from embedkit.heads.vectors import HeadsError

    frame, folder = small_cohort
    _import(store, frame, folder)
    _embed(store, chunk_images=8)
    moved = frame.copy()
    moved.loc[moved["split"] == "test", "split"] = "val"  # re-import: every test row becomes val
    _import(store, moved, folder)
    run = run_probe(store, "tiny-clip", HeadConfig("lp", epochs=1, hidden=8), seed=0)
    preds = store.read("predictions", f"run_id = '{run['run_id']}'")
    assert set(preds["split"].to_pylist()) == {"train", "val"}
    assert json.loads(run["metrics"])["val"]["n"] == int((moved["split"] == "val").sum())
    # a pass killed after some chunks: heads refuse, name what is missing and the command that finishes it
    store.delete("emb_tiny_clip", "row_id IN ('c/00000_000.png', 'c/01001_000.png')")
    with pytest.raises(HeadsError,
                       match=r"2 of 24 rows .*`embedkit embed --model tiny-clip --cohort c --random-init --seed 0`"):
        run_probe(store, "tiny-clip", HeadConfig("lp", epochs=1, hidden=8), seed=0)
    partial = run_probe(store, "tiny-clip", HeadConfig("lp", epochs=1, hidden=8), seed=0, allow_partial=True)
    assert json.loads(partial["config"])["partial"] == {"missing_rows": 2, "rows": 22}


# ---- precision and preprocessing: recorded with the vectors, never mixed --------------------------------------


def _settings(store, model="tiny-clip", weights_id="random-init:tiny-clip:0"):
    from embedkit.embed import embedding_settings

    return embedding_settings(store, model, weights_id, "c")


def test_the_pass_is_fp32_by_default_and_autocasts_only_when_asked(store, small_cohort, monkeypatch):
    import contextlib

    import torch

    from embedkit.device import autocast_context

    frame, folder = small_cohort
    _import(store, frame, folder)
    _embed(store)
    _embed(store, model="tiny-medclip-rn50")
    rows = {r["model"]: r for r in store.read("embedding_settings").to_pylist()}
    assert {m: (r["amp"], r["preprocess"], r["cohort"]) for m, r in rows.items()} == {
        "tiny-clip": ("none", "upstream", "c"), "tiny-medclip-rn50": ("none", "study", "c")}
    assert _settings(store).config() == {"amp": "none", "preprocess": "upstream", "recorded": True}
    # On a GPU the default enters no autocast at all; bf16/fp16 only when asked (a spy: this machine may lack CUDA).
    asked = []
    monkeypatch.setattr(torch, "autocast", lambda device, dtype: asked.append((device, dtype)) or "ctx")
    cuda = torch.device("cuda")
    assert isinstance(autocast_context(cuda, "none"), contextlib.nullcontext) and asked == []
    assert autocast_context(cuda, "bf16") == "ctx" and autocast_context(cuda, "fp16") == "ctx"
    assert asked == [("cuda", torch.bfloat16), ("cuda", torch.float16)]


def test_amp_off_cuda_and_a_preprocessing_the_family_lacks_are_refused_in_one_line(store, small_cohort, monkeypatch,
                                                                                   capsys):
    from embedkit import cli
    from embedkit.embed import EmbedSettingsError
    from embedkit.models.base import PreprocessingError

    frame, folder = small_cohort
    _import(store, frame, folder)
    with pytest.raises(EmbedSettingsError, match="--amp bf16 is autocast on CUDA, and this pass runs on cpu"):
        _embed(store, amp="bf16")
    with pytest.raises(PreprocessingError, match="--preprocess study: this model's family has one preprocessing, "
                                                 "upstream"):
        _embed(store, preprocess="study")
    with pytest.raises(PreprocessingError, match="has the preprocessings study, upstream"):
        _embed(store, model="tiny-medclip-vit", preprocess="bilinear")
    assert not store.has("emb_tiny_clip") and not store.has("embedding_settings")  # refused before any write
    for args, said in ((["--amp", "fp16"], "error: --amp fp16 is autocast on CUDA"),
                       (["--preprocess", "study"], "error: --preprocess study: this model's family has one")):
        monkeypatch.setattr(sys, "argv", ["embedkit", "--store", str(store.path), "embed", "--model", "tiny-clip",
                                          "--cohort", "c", "--random-init", "--device", "cpu", "--quiet", *args])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.startswith(said), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_a_pass_under_other_settings_is_refused_and_force_re_embeds(store, small_cohort):
    from embedkit.embed import EmbedSettingsError

    frame, folder = small_cohort
    _import(store, frame, folder)
    model, weights_id = "tiny-medclip-rn50", "random-init:tiny-medclip-rn50:0"
    _embed(store, model=model)
    before = store.read("emb_tiny_medclip_rn50").to_pandas().set_index("row_id")["vector"]
    with pytest.raises(EmbedSettingsError, match=r"the 24 rows of cohort 'c' already embedded with .* computed with "
                                                 r"amp none, preprocess study; this pass would use amp none, "
                                                 r"preprocess upstream\. .*--force"):
        _embed(store, model=model, preprocess="upstream")
    assert _settings(store, model, weights_id).preprocess == "study"
    assert _embed(store, model=model, preprocess="study").skipped == len(frame)  # the same settings resume
    again = _embed(store, model=model, preprocess="upstream", force=True)
    assert again.rows == len(frame) and _settings(store, model, weights_id).preprocess == "upstream"
    after = store.read("emb_tiny_medclip_rn50").to_pandas().set_index("row_id")["vector"]
    assert len(after) == len(frame)
    assert not np.allclose(np.stack(after[before.index]), np.stack(before))  # bicubic pad != bilinear crop


def test_vectors_from_before_settings_were_recorded_read_as_the_old_default(store, small_cohort):
    from embedkit.embed import EmbedSettingsError

    frame, folder = small_cohort
    _import(store, frame, folder)
    _embed(store)
    _embed(store, model="tiny-gloria")
    store.drop_table("embedding_settings")  # what an older embedkit left: vectors, no record
    old = _settings(store)
    assert old.config() == {"amp": "auto", "preprocess": "upstream", "recorded": False}
    assert _settings(store, "tiny-gloria", "random-init:tiny-gloria:0").preprocess == "pil-box"
    with pytest.raises(EmbedSettingsError, match=r"amp auto, preprocess upstream \(not recorded: .*bf16 autocast on "
                                                 r"a GPU, fp32 on a CPU\).*--force"):
        _embed(store)
    # A record with a null column (a column added since) reads the same way.
    row = {"model": "tiny-clip", "weights_id": "random-init:tiny-clip:0", "cohort": "c", "amp": None,
           "preprocess": "upstream"}
    store.append("embedding_settings", pa.Table.from_pylist([row], schema=schemas.EMBEDDING_SETTINGS),
                 schemas.EMBEDDING_SETTINGS)
    assert _settings(store).config() == {"amp": "auto", "preprocess": "upstream", "recorded": False}
    _embed(store, force=True)
    assert _settings(store).config() == {"amp": "none", "preprocess": "upstream", "recorded": True}


def test_runs_record_the_settings_of_the_vectors_they_used(store, small_cohort):
    from embedkit.heads.probe import HeadConfig, run_probe
    from embedkit.heads.zeroshot import run_zeroshot

    frame, folder = small_cohort
    _import(store, frame, folder)
    _embed(store, model="tiny-medclip-vit", preprocess="upstream")
    zeroshot = run_zeroshot(store, "tiny-medclip-vit", "c")
    probe = run_probe(store, "tiny-medclip-vit", HeadConfig("lp", epochs=1, hidden=8), seed=0)
    for run in (zeroshot, probe):
        assert json.loads(run["config"])["embedding"] == {"amp": "none", "preprocess": "upstream", "recorded": True}


def test_each_family_names_the_preprocessings_its_models_offer():
    """ModelFamily.preprocessings (what a study plans with, no model built) is what image_transforms() offers."""
    from embedkit.models.registry import MODELS, get_spec

    for name in (n for n in MODELS if get_spec(n).tiny):
        spec = get_spec(name)
        assert tuple(spec.build(0).image_transforms()) == spec.family.preprocessings, name


TINY_FIVE = ("tiny-clip", "tiny-biomedclip", "tiny-medclip-rn50", "tiny-medclip-vit", "tiny-gloria")


def _stored(store, model: str):
    from embedkit.embed import localsim_table
    from embedkit.store.store import embeddings_table

    rows = store.read(embeddings_table(model)).to_pandas().set_index("row_id").sort_index()
    local = (store.read(localsim_table(model)).to_pandas().set_index(["row_id", "prompt_set"]).sort_index()
             if store.has(localsim_table(model)) else None)
    return rows, local


def test_a_five_model_pass_writes_what_five_one_model_passes_write(tmp_path, small_cohort, one_thread):
    """Each image decoded once for the five tiny models, part of the cohort already embedded for one of them:
    the same weights_id, rows, vectors and GLoRIA local similarities as five separate passes."""
    from embedkit.embed import ToEmbed, embed_models
    from embedkit.store.store import Store

    frame, folder = small_cohort
    separate, together = Store(tmp_path / "separate"), Store(tmp_path / "together")
    for store in (separate, together):
        _import(store, frame, folder)
    for model in TINY_FIVE:
        _embed(separate, model)
    _embed(together, "tiny-medclip-rn50", cohort="c", chunk_images=8)  # then killed, say: a second pass resumes it
    together.delete("emb_tiny_medclip_rn50", "row_id >= 'c/03'")
    models = []
    for model in TINY_FIVE:
        spec = get_spec(model)
        net, weights_id, source = instantiate(spec, random_init=True, seed=0)
        models.append(ToEmbed(spec, net, weights_id, source))
    # A device budget of MedCLIP-RN50's weights splits the five into groups: [CLIP, BiomedCLIP] [RN50] [ViT, GLoRIA].
    from embedkit.embed import weight_bytes

    budget = weight_bytes(models[2].model)
    summaries = embed_models(together, models, "c", device="cpu", batch_size=5, workers=0, chunk_images=7,
                             progress=False, device_memory=budget)
    assert [s.model for s in summaries] == list(TINY_FIVE)
    assert [s.group for s in summaries] == [(1, 3), (1, 3), (2, 3), (3, 3), (3, 3)]
    assert "(device group 2 of 3)" in summaries[2].line()
    medclip = summaries[2]
    assert medclip.skipped > 0 and medclip.rows + medclip.skipped == len(frame)
    for model, summary in zip(TINY_FIVE, summaries):
        assert summary.weights_id == f"random-init:{model}:0"
        want, want_local = _stored(separate, model)
        got, got_local = _stored(together, model)
        assert got.index.is_unique and list(got.index) == list(want.index), model
        assert (got["weights_id"] == want["weights_id"]).all()
        np.testing.assert_allclose(np.stack(got["vector"]), np.stack(want["vector"]), atol=1e-6, rtol=0,
                                   err_msg=model)
        if want_local is not None:
            assert list(got_local.index) == list(want_local.index)
            for have, expected in zip(got_local["similarity"], want_local["similarity"]):
                np.testing.assert_allclose(have, expected, atol=1e-6, rtol=0)


def test_cli_embeds_several_models_and_all_tiny_ones(tmp_path, small_cohort):
    from embedkit.store.store import Store

    frame, folder = small_cohort
    store = Store(tmp_path / "s")
    _import(store, frame, folder)
    base = ["--store", str(store.path), "embed", "--cohort", "c", "--random-init", "--workers", "0", "--quiet"]
    result = CliRunner().invoke(app, [*base, "--model", "tiny-clip,tiny-medclip-vit", "--preprocess", "upstream"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and "-> table emb_tiny_clip" in lines[0] and "emb_tiny_medclip_vit" in lines[1]
    from embedkit.embed import embedding_settings

    assert embedding_settings(store, "tiny-medclip-vit", "random-init:tiny-medclip-vit:0", "c").preprocess == \
        "upstream"
    refused = CliRunner().invoke(app, [*base, "--model", "all"])  # MedCLIP's default is not what is stored
    assert refused.exit_code == 1 and "computed with amp none, preprocess upstream" in str(refused.exception)
    result = CliRunner().invoke(app, [*base, "--model", "all", "--preprocess", "upstream"])
    assert result.exit_code == 0, result.output
    tiny = [name for name in __import__("embedkit.models.registry", fromlist=["MODELS"]).MODELS if
            name.startswith("tiny-")]
    assert len(result.output.strip().splitlines()) == len(tiny)
    assert "0 rows, 24 already there" in result.output  # tiny-clip's rows were there
    for args, message in ((["--model", "tiny-clip,tiny-clip"], "names a model twice"),
                          (["--model", "clip,gloria", "--weights", str(tmp_path)], "one model's files")):
        result = CliRunner().invoke(app, [*[a for a in base if a != "--random-init"], *args])
        assert result.exit_code != 0 and message in result.output + str(result.exception), result.output


def test_models_with_equal_preprocessings_share_one_tensor_and_one_batch(small_cohort):
    """CLIP and BiomedCLIP preprocess alike, as MedCLIP's two towers do: one tensor per image and one stacked batch
    for each pair; GLoRIA's differs."""
    from embedkit.embed import MultiImageFiles, collate_images

    frame, folder = small_cohort
    names = ("tiny-clip", "tiny-biomedclip", "tiny-medclip-rn50", "tiny-medclip-vit", "tiny-gloria")
    transforms = [instantiate(get_spec(n), random_init=True, seed=0)[0].image_transform() for n in names]
    assert transforms[0] == transforms[1] and transforms[2] == transforms[3] and transforms[0] != transforms[2]
    assert transforms[4] != transforms[2] and hash(transforms[2]) == hash(transforms[3])
    paths = [str(folder / i) for i in frame["image_id"][:3]]
    needs = [(True,) * 5, (True,) * 5, (True, False, True, True, True)]
    data = MultiImageFiles(paths, transforms, needs)
    _, first = data[0]
    assert first[0] is first[1] and first[2] is first[3] and first[0] is not first[4]
    _, per_model = collate_images([data[i] for i in range(3)])
    assert per_model[2][1] is per_model[3][1]  # the MedCLIP pair: the same rows, one batch
    assert per_model[1][0].tolist() == [0, 1] and per_model[1][1] is not per_model[0][1]  # BiomedCLIP lacks row 2
    torch.testing.assert_close(per_model[1][1], per_model[0][1][:2], rtol=0, atol=0)


def test_device_groups_pack_consecutive_models_into_the_budget():
    from torch import nn

    from embedkit.embed import device_groups, weight_bytes

    models = [nn.Linear(10, 10), nn.Linear(20, 20), nn.Linear(5, 5), nn.Linear(40, 40)]
    sizes = [weight_bytes(m) for m in models]
    assert sizes[0] == (100 + 10) * 4
    cpu = torch.device("cpu")
    assert device_groups(models, cpu) == [[0, 1, 2, 3]]  # the CPU: one group
    assert device_groups(models, cpu, sizes[1] + sizes[2]) == [[0], [1, 2], [3]]  # the 40x40 alone, over budget
    assert device_groups(models, cpu, sum(sizes)) == [[0, 1, 2, 3]]


def test_cnn_towers_get_channels_last_batches_on_cuda_and_the_same_vectors(tmp_path, small_cohort, monkeypatch):
    """The rule (CNN towers on CUDA only), then the pass with it forced on this CPU: the same vectors to float
    rounding for the two ResNet towers, so no model code depends on contiguous NCHW input."""
    from embedkit import embed
    from embedkit.store.store import Store

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    built = {n: instantiate(get_spec(n), random_init=True, seed=0)[0]
             for n in ("tiny-medclip-rn50", "tiny-medclip-vit", "tiny-gloria", "tiny-clip")}
    assert [embed.channels_last(m, cuda) for m in built.values()] == [True, False, True, False]
    assert not any(embed.channels_last(m, cpu) for m in built.values())
    frame, folder = small_cohort
    plain, nhwc = Store(tmp_path / "plain"), Store(tmp_path / "nhwc")
    for store in (plain, nhwc):
        _import(store, frame.head(6), folder)
    for model in ("tiny-medclip-rn50", "tiny-gloria"):
        _embed(plain, model)
    seen = []
    monkeypatch.setattr(embed, "channels_last", lambda model, dev: model.convolutional())
    for model in ("tiny-medclip-rn50", "tiny-gloria"):
        net, weights_id, source = instantiate(get_spec(model), random_init=True, seed=0)
        net.encode_image_extras = lambda pixels, ctx, f=net.encode_image_extras: (
            seen.append(pixels.is_contiguous(memory_format=torch.channels_last)) or f(pixels, ctx))
        embed_cohort(nhwc, get_spec(model), net, weights_id, source, "c", device="cpu", workers=0, progress=False)
        want, got = _stored(plain, model), _stored(nhwc, model)
        np.testing.assert_allclose(np.stack(got[0]["vector"]), np.stack(want[0]["vector"]), atol=1e-5, rtol=0)
    assert seen and all(seen)
