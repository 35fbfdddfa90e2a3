"""Where runs go, and failing fast when they can't be recorded."""

from __future__ import annotations

import json
import os
import time

import pytest

from reprovision.core import track


def test_project_root_sees_through_dvc_temporary_copies(tmp_path):
    temp_copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    temp_copy.mkdir(parents=True)
    assert track.project_root(temp_copy) == tmp_path / "repo"
    assert track.project_root(tmp_path / "repo") == tmp_path / "repo"


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert track.tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A running server (this process stands in for it) wins over the SQLite default...
    state = tmp_path / track.SERVER_STATE
    state.mkdir()
    (state / "server.json").write_text(json.dumps({"pid": os.getpid(), "uri": "http://127.0.0.1:5999"}))
    assert track.tracking_uri(tmp_path) == "http://127.0.0.1:5999"
    # ...a dead one does not...
    (state / "server.json").write_text(json.dumps({"pid": 2**22 + 12345, "uri": "http://127.0.0.1:5999"}))
    assert track.tracking_uri(tmp_path).startswith("sqlite:///")
    # ...and MLFLOW_TRACKING_URI wins over everything.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:1")
    assert track.tracking_uri(tmp_path) == "http://example.invalid:1"


def test_unwritable_sqlite_store_is_refused_before_training(tmp_path):
    missing = tmp_path / "no-such-folder" / "mlflow.db"
    with pytest.raises(track.TrackingError, match="not writable.*Nothing was trained"):
        track.check_store(f"sqlite:///{missing}")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "mlflow.db").write_bytes(b"")
    (locked / "mlflow.db").chmod(0o444)
    if os.access(locked / "mlflow.db", os.W_OK):  # root ignores file modes: make the folder itself unusable
        (locked / "mlflow.db").unlink()
        locked.rmdir()
        locked.write_text("a file, not a folder")
    with pytest.raises(track.TrackingError, match="not writable"):
        track.check_store(f"sqlite:///{locked / 'mlflow.db'}")


def test_unreachable_server_is_refused_with_the_fix(tmp_path):
    with pytest.raises(track.TrackingError, match="not reachable.*reprovision mlflow-server start"):
        track.check_store("http://127.0.0.1:9")


def test_the_stage_runs_of_one_experiment_nest_under_one_run_itself_under_a_callers(tmp_path, monkeypatch):
    """`dvc exp run` sets DVC_EXP_NAME for each stage: the first stage that logs makes the group run,
    the next one finds it; REPROVISION_PARENT_RUN_ID (set by `reprovision tune`) nests the group."""
    import mlflow

    from reprovision.config import Params

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    outer = client.create_run(client.create_experiment("outer")).info.run_id
    monkeypatch.setenv(track.PARENT_RUN_ENV, outer)
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-exp")
    runs = []
    for stage in ("train-vit", "train-cnn"):
        with track.stage_run(stage, stage[6:], {}, {}, Params(), root=tmp_path) as run:
            runs.append(run.info.run_id)
    experiment = client.get_experiment_by_name(track.experiment_name()).experiment_id
    [group] = client.search_runs([experiment], f"tags.stage = '{track.EXP_PARENT}'")
    assert group.info.run_name == "brisk-exp" and group.data.tags["mlflow.parentRunId"] == outer
    assert all(client.get_run(r).data.tags["mlflow.parentRunId"] == group.info.run_id for r in runs)
    monkeypatch.delenv("DVC_EXP_NAME")  # a plain `dvc repro`: under the caller's run only, no group
    with track.stage_run("train-vit", "vit", {}, {}, Params(), root=tmp_path) as run:
        pass
    assert client.get_run(run.info.run_id).data.tags["mlflow.parentRunId"] == outer
    assert len(client.search_runs([experiment], f"tags.stage = '{track.EXP_PARENT}'")) == 1


def test_the_group_run_spans_its_stage_runs_and_fails_with_one(tmp_path, monkeypatch):
    """A `dvc exp run`'s group run starts before its first stage run and ends with its last; it is
    RUNNING while a stage runs, FINISHED once all finished, and FAILED from the first stage that fails."""
    import mlflow

    from reprovision.config import Params

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "spanning-exp")
    client = mlflow.MlflowClient(uri)

    def group():
        experiment = client.get_experiment_by_name(track.experiment_name()).experiment_id
        [found] = client.search_runs([experiment], f"tags.stage = '{track.EXP_PARENT}'")
        return found.info

    def stage(name: str, fail: bool = False, meanwhile: str = "RUNNING"):
        with track.stage_run(name, name, {}, {}, Params(), root=tmp_path) as run:
            assert group().status == meanwhile
            time.sleep(0.05)  # stages that take time: the group's span must cover it
            if fail:
                raise RuntimeError(f"{name} broke")
        return client.get_run(run.info.run_id).info

    first = stage("train-vit")
    assert group().status == "FINISHED" and group().start_time <= first.start_time
    assert group().end_time == first.end_time
    second = stage("train-cnn")
    assert group().status == "FINISHED" and group().end_time == second.end_time > first.end_time
    assert group().end_time - group().start_time >= (second.end_time - first.start_time)
    with pytest.raises(RuntimeError, match="evaluate broke"):
        stage("evaluate", fail=True)
    [failed] = client.search_runs([first.experiment_id], "tags.stage = 'evaluate'")
    assert failed.info.status == "FAILED"
    assert group().status == "FAILED" and group().end_time == failed.info.end_time
    last = stage("report", meanwhile="FAILED")  # a stage after the failure: the group spans it and stays FAILED
    assert group().status == "FAILED" and group().end_time == last.end_time and group().start_time <= first.start_time


def test_the_experiment_is_mlflow_experiment_name_when_set(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert track.experiment_name() == "reprovision"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-vit")
    assert track.experiment_name() == "team-vit"


def test_reproducing_an_unknown_run_id_is_one_clear_error(tmp_path, monkeypatch):
    """`reprovision reproduce <a run id the store lacks>` names the id and the store, no MLflow traceback."""
    from reprovision.tools.reproduce import ReproduceError, reproduce

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(
        ReproduceError, match=rf"no run 'no-such-run' in the tracking store {uri} .*MLFLOW_TRACKING_URI"
    ):
        reproduce("no-such-run")
