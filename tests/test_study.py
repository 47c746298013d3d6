"""`embedkit study`: the matrix as steps, resumable (stop_after and SIGKILL), plans, GPU skips, study files, report.

A 24-image cohort (6 classes x 4 noise PNGs of 64x64, train/val/test) imported as cohort `c`; tiny models at
random init; probe_epochs 2, ft_epochs 1, no bootstrap. Anything that fine-tunes is marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_cohort_images
from embedkit.cli import app
from embedkit.study import StudyError, make_config, plan_lines, plan_study, run_study, step_key, stored_study

TINY = ("tiny-clip", "tiny-biomedclip", "tiny-medclip-rn50", "tiny-medclip-vit", "tiny-gloria")
CHEAP = dict(cohort="c", random_init=True, probe_epochs=2, ft_epochs=1, ci=0, workers=0)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "images"
    return write_cohort_images(folder, n_per_class=4, size=64), folder


def _store_with_cohort(root: Path, images) -> "Store":  # noqa: F821
    from embedkit.data.cohort import import_cohort, validate_cohort
    from embedkit.store.store import Store

    frame, folder = images
    store = Store(root / "store")
    import_cohort(store, validate_cohort(frame, "c", images_dir=folder), "c")
    return store


@pytest.fixture(scope="module")
def shared(tmp_path_factory, images):
    """One store for the head-only studies: they share tiny-clip's embedding (each study has its own name)."""
    return _store_with_cohort(tmp_path_factory.mktemp("shared"), images)


def _study_runs(store, name: str) -> list[dict]:
    from embedkit.store.store import sql_eq

    return store.read("runs", sql_eq("study_id", name)).to_pylist() if store.has("runs") else []


def _statuses(steps) -> dict[tuple, str]:
    return {(s.kind, s.model, s.seed): s.status for s in steps}


# ---- study files and flags -------------------------------------------------------------------------------------

FILE_SETTINGS = dict(name="paper", models=["tiny-clip", "tiny-gloria"], methods=["zeroshot", "lp"], cohort="c",
                     seeds=[1, 2], random_init=True, device="cpu", cpu_ok=True, probe_epochs=3, ft_epochs=2)
YAML = """name: paper
models: [tiny-clip, tiny-gloria]
methods: [zeroshot, lp]
cohort: c
seeds: [1, 2]
random_init: true
device: cpu
cpu_ok: true
probe_epochs: 3
ft-epochs: 2
"""
TOML = """name = "paper"
models = ["tiny-clip", "tiny-gloria"]
methods = ["zeroshot", "lp"]
cohort = "c"
seeds = [1, 2]
random_init = true
device = "cpu"
cpu_ok = true
probe_epochs = 3
ft-epochs = 2
"""


def test_yaml_and_toml_study_files_give_the_flags_config(tmp_path):
    flags = make_config(**{k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in FILE_SETTINGS.items()})
    assert flags.models == ("tiny-clip", "tiny-gloria") and flags.seeds == (1, 2) and flags.ft_epochs == 2
    for suffix, text in ((".yaml", YAML), (".toml", TOML)):
        path = tmp_path / f"study{suffix}"
        path.write_text(text)
        config = make_config(path)
        assert config.to_json() == {**flags.to_json(), "file": text}  # same settings, and the text is kept
        overridden = make_config(path, seeds="5-6", probe_epochs=7)  # explicit flags win over the file
        assert overridden.seeds == (5, 6) and overridden.probe_epochs == 7
        assert overridden.models == flags.models


@pytest.mark.parametrize("suffix, text", [(".yaml", "models: [tiny-clip]\nepochs: 3\nmodles: x\n"),
                                          (".toml", 'models = ["tiny-clip"]\nepochs = 3\nmodles = "x"\n')])
def test_an_unknown_key_in_a_study_file_is_an_error_naming_it(tmp_path, suffix, text):
    path = tmp_path / f"study{suffix}"
    path.write_text(text)
    with pytest.raises(StudyError, match=r"unknown key\(s\) epochs, modles; known keys: name, models"):
        make_config(path)


def test_bad_settings_fail_at_the_door(tmp_path):
    with pytest.raises(StudyError, match="unknown model.*tiny-clop"):
        make_config(models="tiny-clop")
    with pytest.raises(StudyError, match="unknown method.*logreg"):
        make_config(methods="lp,logreg")
    with pytest.raises(StudyError, match="exclude each other"):
        make_config(random_init=True, weights_dir=str(tmp_path))
    with pytest.raises(StudyError, match=r"^bad seeds '7,x': use a range"):  # names the setting, a flag or a file key
        make_config(seeds="7,x")
    path = tmp_path / "s.yaml"
    path.write_text("cpu_ok: yes please\n")
    with pytest.raises(StudyError, match="cpu_ok must be true or false"):
        make_config(path)


def test_cli_plan_takes_the_file_and_lets_flags_override_it_and_writes_nothing(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(YAML.replace("cohort: c", "cohort: synthetic"))
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["--store", str(store), "study", "--file", str(path), "--seeds", "9",
                                      "--plan", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["config"]["seeds"] == [9] and out["config"]["models"] == ["tiny-clip", "tiny-gloria"]
    assert out["config"]["file"] == path.read_text()
    kinds = [(s["kind"], s["model"], s["seed"]) for s in out["steps"]]
    assert kinds == [("cohort", None, None), ("embed", "tiny-clip", None), ("embed", "tiny-gloria", None),
                     ("zeroshot", "tiny-clip", None), ("lp", "tiny-clip", 9),
                     ("zeroshot", "tiny-gloria", None), ("lp", "tiny-gloria", 9)]
    assert "synthesise 'synthetic' (1200 X-rays" in out["steps"][0]["note"]
    assert not store.exists()  # --plan runs nothing


# ---- preconditions -----------------------------------------------------------------------------------------------


def test_a_missing_cohort_names_the_embedkit_data_command_and_nothing_runs(store):
    config = make_config(name="s", models="tiny-clip", methods="zeroshot", cohort="mine", random_init=True)
    (cohort,) = [s for s in plan_study(store, config) if s.kind == "cohort"]
    assert cohort.status == "blocked"
    assert "`embedkit data import MANIFEST.csv --cohort mine --images DIR`" in cohort.note
    nih = make_config(name="s", models="tiny-clip", methods="zeroshot", cohort="nih6x200-paper", random_init=True)
    assert "embedkit data nih --protocol nih6x200-paper --images DIR" in plan_study(store, nih)[0].note
    with pytest.raises(StudyError, match="nothing was done"):
        run_study(store, config, progress=False)
    assert not store.has("studies")


def test_released_weights_use_the_weights_id_recorded_for_their_path(store, tmp_path, monkeypatch):
    import pyarrow as pa

    from embedkit.models.registry import ModelSpec
    from embedkit.store import schemas

    folder = tmp_path / "weights" / "clip"
    folder.mkdir(parents=True)
    monkeypatch.setattr(ModelSpec, "find_weights", lambda self, weights_dir=None: folder)
    config = make_config(name="w", models="clip", methods="zeroshot,lp", cohort="synthetic", seeds="1",
                         weights_dir=str(tmp_path / "weights"))
    embed = plan_study(store, config)[1]
    assert (embed.kind, embed.weights_id, embed.status) == ("embed", None, "todo")
    assert "loads and hashes the weights" in embed.note
    assert [s.note for s in plan_study(store, config) if s.kind == "lp"] == ["weights_id known once the model is "
                                                                              "embedded"]
    row = {"model": "clip", "weights_id": "sha256:abc", "source": str(folder), "embed_dim": 512, "logit_scale": 100.0,
           "zeroshot_rule": "scaled_cosine", "created_at": None}
    store.append("weights", pa.Table.from_pylist([row], schema=schemas.WEIGHTS), schemas.WEIGHTS)
    steps = plan_study(store, config)
    assert steps[1].weights_id == "sha256:abc" and steps[1].status == "todo"
    assert steps[-1].key.startswith("lp|clip|sha256:abc|seed=1|")


def test_gpu_regimes_are_skipped_with_a_note_unless_cpu_ok(store, monkeypatch):
    from embedkit.study import plan

    monkeypatch.setattr(plan, "has_gpu", lambda device: False)  # a CPU-only machine, whatever runs the test
    config = make_config(name="g", models="tiny-clip", methods="lp,lora,ft", seeds="1", cohort="synthetic",
                         random_init=True)
    steps = plan_study(store, config)
    skipped = [s for s in steps if s.status == "skipped"]
    assert [(s.kind, s.seed) for s in skipped] == [("lora", 1), ("ft", 1)]
    assert all("needs a GPU" in s.note and "--cpu-ok" in s.note for s in skipped)
    assert _statuses(steps)[("lp", "tiny-clip", 1)] == "todo"
    config.cpu_ok = True
    assert {s.status for s in plan_study(store, config) if s.kind in ("lora", "ft")} == {"todo"}
    monkeypatch.undo()  # an explicit --device cpu skips them too, on any machine
    config = make_config(name="g", models="tiny-clip", methods="ft", seeds="1", cohort="synthetic",
                         random_init=True, device="cpu")
    assert _statuses(plan_study(store, config))[("ft", "tiny-clip", 1)] == "skipped"


# ---- running, resuming, planning (heads only: seconds) ----------------------------------------------------------


def test_stop_after_and_rerun_finish_without_redoing_steps(tmp_path, images):
    store = _store_with_cohort(tmp_path, images)  # its own: no other test has embedded anything in it
    config = make_config(name="resume", models="tiny-clip", methods="zeroshot,lp,mlp", seeds="1,2", **CHEAP)
    total = len(run_study(store, config, plan_only=True).todo)
    assert total == 6  # the embedding, 1 zero-shot, 2 lp, 2 mlp
    first = run_study(store, config, progress=False, stop_after=3)
    assert len(first.run) == 3 and first.stopped and first.report is None
    second = run_study(store, config, progress=False)
    assert len(second.run) == total - 3 and not second.stopped
    runs = _study_runs(store, "resume")
    assert sorted((r["method"], r["seed"]) for r in runs) == [("lp", 1), ("lp", 2), ("mlp", 1), ("mlp", 2),
                                                              ("zeroshot", None)]
    assert second.report == store.path.parent / "study-resume" / "report.html" and second.report.is_file()
    assert {s.run_id for s in second.steps if s.run_id} == {r["run_id"] for r in runs}
    row = stored_study(store, "resume")
    assert row["config"]["seeds"] == [1, 2] and row["created_at"] <= row["updated_at"]

    again = run_study(store, config, plan_only=True)
    assert again.nothing_to_do and not again.todo
    assert plan_lines(again)[-1].startswith("nothing to do: 7 done, 0 to do")
    rerun = run_study(store, config, progress=False)
    assert rerun.run == [] and len(_study_runs(store, "resume")) == 5  # a finished study runs nothing

    grown = make_config(name="resume", models="tiny-clip", methods="zeroshot,lp,mlp", seeds="1,2,3", **CHEAP)
    planned = run_study(store, grown, plan_only=True).todo
    assert [(s.kind, s.seed) for s in planned] == [("lp", 3), ("mlp", 3)]  # zero-shot has no seed
    assert all(s.estimate_s and s.estimate_s > 0 for s in planned)


def test_a_study_keeps_its_settings(shared):
    config = make_config(name="fixed", models="tiny-clip", methods="zeroshot", **CHEAP)
    run_study(shared, config, progress=False)
    changed = make_config(name="fixed", models="tiny-clip", methods="zeroshot", **{**CHEAP, "probe_epochs": 3})
    with pytest.raises(StudyError, match=r"probe_epochs 2 -> 3.*another --name"):
        run_study(shared, changed, plan_only=True)


def test_runs_outside_the_study_do_not_count_as_its_steps(shared):
    from embedkit.heads.probe import HeadConfig, run_probe
    from embedkit.models.registry import random_init_id

    wid = random_init_id("tiny-clip", 0)
    run_probe(shared, "tiny-clip", HeadConfig("lp", epochs=2), 1, "c", wid)  # same settings, no study
    config = make_config(name="other", models="tiny-clip", methods="lp", seeds="1", **CHEAP)
    (lp,) = [s for s in plan_study(shared, config) if s.kind == "lp"]
    assert lp.status == "todo" and lp.key == step_key("lp", "tiny-clip", wid, 1, {"cohort": "c", "epochs": 2})


# ---- slow: fine-tuning, a killed process, the full matrix -------------------------------------------------------


def test_without_cpu_ok_a_cpu_study_runs_the_heads_and_reports_them(shared, monkeypatch):
    from embedkit.study import plan

    monkeypatch.setattr(plan, "has_gpu", lambda device: False)
    config = make_config(name="nocpu", models="tiny-clip", methods="lp,ft", seeds="1", **CHEAP)
    result = run_study(shared, config, progress=False)
    assert [(s.kind, s.status) for s in result.steps if s.kind in ("lp", "ft")] == [("lp", "done"), ("ft", "skipped")]
    assert [r["method"] for r in _study_runs(shared, "nocpu")] == ["lp"]
    assert "full fine-tuning" not in result.report.with_name("report.md").read_text()


@pytest.mark.slow
def test_a_fine_tune_cut_short_is_resumed_from_its_checkpoint(shared, monkeypatch):
    from embedkit.finetune import train
    from embedkit.models.registry import random_init_id
    from embedkit.study.run import _finetune_run_id

    config = make_config(name="ckpt", models="tiny-clip", methods="lora", seeds="1", cpu_ok=True,
                         **{**CHEAP, "ft_epochs": 2})
    key = step_key("lora", "tiny-clip", random_init_id("tiny-clip", 0), 1, {"cohort": "c", "epochs": 2})
    run_id = _finetune_run_id("ckpt", key)
    # What a killed study leaves: the step's run, checkpointed after its first epoch and never finished.
    cut = train.finetune(shared, train.FinetuneConfig(model="tiny-clip", method="lora", cohort="c", random_init=True,
                                                      epochs=2, seed=1, workers=0, study_id="ckpt"),
                         progress=False, stop_after=1, run_id=run_id)
    assert not cut.finished and (cut.checkpoint_dir / "last.pt").is_file()
    resumed = []
    real_resume = train.resume
    monkeypatch.setattr(train, "resume", lambda store, rid, **kw: resumed.append(rid) or real_resume(store, rid, **kw))
    result = run_study(shared, config, progress=False)
    assert resumed == [run_id] and [s.run_id for s in result.run if s.kind == "lora"] == [run_id]
    (run,) = [r for r in _study_runs(shared, "ckpt") if r["method"] == "lora"]
    assert (run["run_id"], run["seed"], json.loads(run["metrics"])["epochs_run"]) == (run_id, 1, 2)


@pytest.mark.slow
def test_a_study_killed_with_sigkill_resumes_without_duplicates(tmp_path, images):
    store = _store_with_cohort(tmp_path, images)
    args = ["--name", "k", "--models", "tiny-clip", "--methods", "lp,lora", "--seeds", "1-3", "--cohort", "c",
            "--random-init", "--cpu-ok", "--probe-epochs", "2", "--ft-epochs", "3", "--ci", "0", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "embedkit.cli", "--store", str(store.path), "study", *args,
                             "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        # Kill it once the first LoRA run is written: the second one is then mid-training (or just starting).
        while not any(r["method"] == "lora" for r in _study_runs(store, "k")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the study never wrote a LoRA run"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    config = make_config(name="k", models="tiny-clip", methods="lp,lora", seeds="1-3", cpu_ok=True,
                         **{**CHEAP, "ft_epochs": 3})
    todo = run_study(store, config, plan_only=True).todo
    assert 1 <= len(todo) <= 2 and {s.kind for s in todo} == {"lora"}
    result = run_study(store, config, progress=False)
    assert [s.key for s in result.run] == [s.key for s in todo]
    runs = _study_runs(store, "k")
    assert sorted((r["method"], r["seed"]) for r in runs) == [("lora", 1), ("lora", 2), ("lora", 3), ("lp", 1),
                                                              ("lp", 2), ("lp", 3)]
    assert all(json.loads(r["metrics"])["epochs_run"] == 3 for r in runs if r["method"] == "lora")
    assert not list((store.path / "checkpoints").glob("*/last.pt"))  # resumed or restarted, then finished
    assert result.report.is_file()


@pytest.mark.slow
def test_the_full_tiny_matrix_with_an_interruption(tmp_path, images):
    store = _store_with_cohort(tmp_path, images)
    config = make_config(name="full", models=",".join(TINY), seeds="1,2", cpu_ok=True, **CHEAP)
    assert config.methods == ("zeroshot", "lp", "mlp", "lora", "ft")
    total = len(run_study(store, config, plan_only=True).todo)
    assert total == 5 + 5 * (1 + 2 + 2) + 5 * (2 + 2)  # embeddings, heads, fine-tunes
    first = run_study(store, config, progress=False, stop_after=12)
    second = run_study(store, config, progress=False)
    assert len(first.run) == 12 and len(second.run) == total - 12
    runs = _study_runs(store, "full")
    keys = [(r["model"], r["method"], r["seed"]) for r in runs]
    assert len(keys) == len(set(keys)) == 5 * 9
    assert {r["weights_id"] for r in runs} == {f"random-init:{m}:0" for m in TINY}
    report = second.report.with_name("report.md").read_text()
    utility = report.split("### Utility")[1].split("###")[0]
    labels = {"zeroshot": "zero-shot | 1 run", "lp": "linear probe | 2 runs", "mlp": "MLP head | 2 runs",
              "lora": "LoRA | 2 runs", "ft": "full fine-tuning | 2 runs"}
    for model in TINY:
        for method, label in labels.items():
            assert f"| {model} | random weights | {label}" in utility, (model, method)
    assert run_study(store, config, plan_only=True).nothing_to_do


def test_amp_and_preprocess_reach_every_pass_and_vectors_computed_otherwise_block_the_plan(tmp_path, images):
    from embedkit.embed import embedding_settings
    from embedkit.models.registry import random_init_id

    store = _store_with_cohort(tmp_path, images)
    config = make_config(name="up", models="tiny-medclip-rn50,tiny-clip", methods="zeroshot", preprocess="upstream",
                         **CHEAP)
    run_study(store, config, progress=False)
    for model in ("tiny-medclip-rn50", "tiny-clip"):  # MedCLIP's upstream; CLIP's only preprocessing
        settings = embedding_settings(store, model, random_init_id(model, 0), "c")
        assert (settings.amp, settings.preprocess, settings.recorded) == ("none", "upstream", True)
    other = make_config(name="st", models="tiny-medclip-rn50,tiny-clip", methods="zeroshot", **CHEAP)
    steps = {(s.kind, s.model): s for s in plan_study(store, other)}
    assert steps["embed", "tiny-clip"].status == "done"  # one preprocessing: the study's and the authors'
    blocked = steps["embed", "tiny-medclip-rn50"]
    assert blocked.status == "blocked" and "preprocess upstream" in blocked.note and "--force" in blocked.note
    assert steps["zeroshot", "tiny-medclip-rn50"].status == "blocked"
    with pytest.raises(StudyError, match="--amp bf16 is autocast on CUDA"):
        make_config(name="x", amp="bf16", **{**CHEAP, "device": "cpu"})
    with pytest.raises(StudyError, match="--preprocess must be one of study, upstream"):
        make_config(name="x", preprocess="bicubic", **CHEAP)
