"""`embedkit study --executor ray`: the steps as Ray tasks on a local cluster (loopback only), against the in-process
executor; a worker killed mid-task is retried and leaves no duplicate; resource requests and the wall-time estimate.

The cluster (2 CPUs, no dashboard) starts once for the module; it inherits EMBEDKIT_FAULT_STEP, which kills the
worker of the first lp task right after its run is committed and the first mlp task before it does anything.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import main_cli, write_cohort_images
from embedkit.study import StudyError, make_config, run_study
from embedkit.study import ray_exec
from embedkit.study.plan import Step

CHEAP = dict(cohort="c", random_init=True, probe_epochs=2, ft_epochs=1, ci=0, workers=0, cpu_ok=True)
MATRIX = dict(models="tiny-clip,tiny-gloria", methods="zeroshot,lp,mlp,lora", seeds="1")


def _store_with_cohort(root: Path, images):
    from embedkit.data.cohort import import_cohort, validate_cohort
    from embedkit.store.store import Store

    frame, folder = images
    store = Store(root / "store")
    import_cohort(store, validate_cohort(frame, "c", images_dir=folder), "c")
    return store


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray") / "images"
    return write_cohort_images(folder, n_per_class=4, size=64), folder


@pytest.fixture(scope="module")
def markers(tmp_path_factory):
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def cluster(markers):
    ray = pytest.importorskip("ray")
    os.environ[ray_exec.FAULT_STEP_ENV] = f"lp:after:{markers / 'lp-after'},mlp:before:{markers / 'mlp-before'}"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 logging_level="WARNING")
        yield ray
    finally:
        ray.shutdown()
        os.environ.pop(ray_exec.FAULT_STEP_ENV, None)


def _runs(store, name: str) -> dict[tuple, dict]:
    from embedkit.store.store import sql_eq

    rows = store.read("runs", sql_eq("study_id", name)).to_pylist()
    keyed = {(r["method"], r["model"], r["seed"]): r for r in rows}
    assert len(keyed) == len(rows), "a step left two runs"
    return keyed


def _predictions(store, run_id: str) -> list[tuple]:
    from embedkit.store.store import sql_eq

    table = store.read("predictions", sql_eq("run_id", run_id)).to_pylist()
    return sorted((r["row_id"] if "row_id" in r else r["image_id"], r["split"], r["y_true"], r["y_pred"],
                   tuple(r["probs"])) for r in table)


def _comparable(config: str) -> dict:
    return {k: v for k, v in json.loads(config).items() if k not in ("created_at",)}


@pytest.mark.slow
def test_the_ray_executor_leaves_the_store_the_in_process_one_does_and_retries_a_killed_worker(
        cluster, images, markers, tmp_path, one_thread):
    config = make_config(name="r", **MATRIX, **CHEAP)
    local_store = _store_with_cohort(tmp_path / "local", images)
    ray_store = _store_with_cohort(tmp_path / "ray", images)
    run_study(local_store, config, progress=False)

    planned = run_study(ray_store, config, plan_only=True, executor="ray")
    assert planned.cluster["cpus"] == 2 and planned.cluster["gpus"] == 0
    assert planned.wall_estimate_s and planned.wall_estimate_s < sum(s.estimate_s for s in planned.todo)
    result = run_study(ray_store, config, progress=False, executor="ray")
    assert (markers / "lp-after").is_file() and (markers / "mlp-before").is_file()  # both workers were killed
    assert {s.key for s in result.run} == {s.key for s in planned.todo}
    assert result.report.is_file()

    local, remote = _runs(local_store, "r"), _runs(ray_store, "r")
    assert sorted(local) == sorted(remote) and len(local) == 2 * 4
    for key, run in local.items():
        other = remote[key]
        assert (other["weights_id"], other["cohort"]) == (run["weights_id"], run["cohort"]), key
        assert _comparable(other["config"]) == _comparable(run["config"]), key
        if run["method"] == "lora":  # deterministic run ids: the same on both executors
            assert other["run_id"] == run["run_id"]
        mine, theirs = _predictions(local_store, run["run_id"]), _predictions(ray_store, other["run_id"])
        assert [p[:4] for p in mine] == [p[:4] for p in theirs], key
        assert all(max(abs(a - b) for a, b in zip(p[4], q[4])) < 1e-5 for p, q in zip(mine, theirs)), key
    counted = ray_store.count("predictions")
    assert counted == local_store.count("predictions")  # the killed-after-commit lp left no second copy

    again = run_study(ray_store, config, progress=False, executor="ray")
    assert again.run == [] and ray_store.count("predictions") == counted


@pytest.mark.slow
def test_cli_plan_with_ray_prints_the_cluster_estimate(cluster, images, tmp_path, monkeypatch, capsys):
    store = _store_with_cohort(tmp_path, images)
    code, out, err = main_cli(monkeypatch, capsys, "--store", str(store.path), "study", "--name", "p",
                              "--models", "tiny-clip", "--methods", "zeroshot,lp", "--seeds", "1", "--cohort", "c",
                              "--random-init", "--executor", "ray", "--plan")
    assert code == 0, err
    assert "estimated wall time on the Ray cluster (1 node, 2 CPUs, 0 GPUs" in out
    assert not (store.path / "runs.lance").exists()


# ---- fast: no cluster ---------------------------------------------------------------------------------------------


def test_executor_ray_without_ray_is_one_error_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, out, err = main_cli(monkeypatch, capsys, "--store", str(tmp_path / "s"), "study", "--models", "tiny-clip",
                              "--cohort", "synthetic", "--random-init", "--executor", "ray", "--plan")
    assert code != 0 and err.startswith("error: --executor ray needs Ray") and "embedkit[ray]" in err
    assert "Traceback" not in err
    code, out, err = main_cli(monkeypatch, capsys, "--store", str(tmp_path / "s"), "study", "--executor", "dask",
                              "--plan")
    assert code != 0 and "--executor must be one of local, ray, not 'dask'" in err
    code, out, err = main_cli(monkeypatch, capsys, "--store", str(tmp_path / "s"), "study", "--address", "auto",
                              "--plan")
    assert code != 0 and err.startswith("error: --address names a Ray cluster: pass it with --executor ray")


def test_an_address_nothing_listens_on_is_one_error_line_at_once(monkeypatch, capsys, tmp_path):
    """Ray retries an unreachable cluster for minutes, logging as it goes: embedkit tries the port first."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = ["--store", str(tmp_path / "s"), "study", "--models", "tiny-clip", "--cohort", "synthetic",
            "--random-init", "--executor", "ray", "--plan"]
    code, out, err = main_cli(monkeypatch, capsys, *base, "--address", f"127.0.0.1:{port}")
    assert code != 0 and err.startswith(f"error: could not reach a Ray cluster at 127.0.0.1:{port}")
    assert len(err.strip().splitlines()) == 1
    code, out, err = main_cli(monkeypatch, capsys, *base, "--address", "nonsense")
    assert code != 0 and err.startswith("error: --address 'nonsense' is not host:port")


FACTS = {"cpus": 2.0, "gpus": 0.0, "memory": 8.0 * 2 ** 30, "nodes": 1, "node_cpus": 2.0, "node_gpus": 0.0,
         "node_memory": 8.0 * 2 ** 30}


def _steps() -> list[Step]:
    steps = [Step("cohort", key="cohort|c", estimate_s=1.0)]
    for model in ("tiny-clip", "tiny-gloria"):
        steps.append(Step("embed", model, estimate_s=10.0))
    for model in ("tiny-clip", "tiny-gloria"):
        steps += [Step("lp", model, seed, estimate_s=2.0) for seed in (1, 2)]
    steps.append(Step("ft", "tiny-clip", 1, estimate_s=30.0))
    return steps


def test_the_wall_estimate_schedules_the_steps_on_the_clusters_resources():
    config = make_config(**CHEAP)
    steps = _steps()
    serial = sum(s.estimate_s for s in steps)
    one = ray_exec.estimate_wall(steps, config, {**FACTS, "cpus": 1.0})
    two = ray_exec.estimate_wall(steps, config, FACTS)
    assert one == pytest.approx(serial)  # one CPU: one step at a time
    # two CPUs, in plan order: the cohort; both embeddings side by side; the heads two at a time; then the ft
    assert two == pytest.approx(1 + 10 + 2 + 2 + 30)
    assert ray_exec.estimate_wall(steps[:1] + [Step("embed", "tiny-clip")], config, FACTS) is None


def test_resource_requests_ask_for_a_gpu_only_where_images_stream_and_the_cluster_has_one():
    config = make_config(**{**CHEAP, "workers": 3})
    embed, lp, ft = Step("embed", "clip"), Step("lp", "clip", 1), Step("ft", "clip", 1)
    assert ray_exec.step_resources(embed, config, gpus=True) == {"num_cpus": 3, "num_gpus": 1, "memory": 4 * 2 ** 30}
    assert ray_exec.step_resources(lp, config, gpus=True)["num_gpus"] == 0
    assert ray_exec.step_resources(ft, config, gpus=False)["num_gpus"] == 0
    assert ray_exec.step_resources(ft, config, gpus=True)["memory"] == 8 * 2 ** 30
    assert ray_exec.step_resources(embed, make_config(**{**CHEAP, "device": "cpu"}), gpus=True)["num_gpus"] == 0
    with pytest.raises(StudyError, match=r"step 'embed clip' asks for 3 CPU\(s\).*lower --workers"):
        ray_exec.check_fits([embed], config, FACTS)


def test_a_failed_tasks_embedkit_error_reaches_the_user_as_its_own_line():
    ray = pytest.importorskip("ray")
    from embedkit.store.store import StoreError

    step = Step("lp", "tiny-clip", 1)
    own = StoreError("No space left on device while writing table 'runs'")
    wrapped = ray.exceptions.RayTaskError("run_step_task", "Traceback ...", own)
    assert ray_exec._failure(step, wrapped) is own
    other = ray_exec._failure(step, ray.exceptions.RayTaskError("run_step_task", "Traceback ...", ValueError("bad")))
    assert isinstance(other, StudyError)
    assert str(other).startswith("step 'lp tiny-clip seed 1' failed on the Ray cluster (ValueError: bad;")
