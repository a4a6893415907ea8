"""rcnnops.tracking and rcnnops.store_template: a new SQLite tracking store starts as
a copy of an empty store MLflow migrated once (start_from_template), and is otherwise
MLflow's own; datasets logged by runs at once."""

from __future__ import annotations

import mlflow
import mlflow.store.db.utils as db_utils
import pytest

from rcnnops import store_template, tracking


@pytest.fixture
def migrations(monkeypatch) -> list[str]:
    """The engines MLflow ran its table creation and migrations on."""
    ran: list[str] = []
    real = db_utils._initialize_tables

    def counted(engine):
        ran.append(str(engine.url))
        return real(engine)

    monkeypatch.setattr(db_utils, "_initialize_tables", counted)
    return ran


def _logged(project, experiment="exp"):
    """Set up the project's store, log one run, read it back."""
    exp_id = tracking.setup(experiment, project)
    with mlflow.start_run(experiment_id=exp_id):
        mlflow.log_metric("m", 0.5)
    runs = tracking.client().search_runs([exp_id])
    return exp_id, runs


def test_new_stores_copy_one_migrated_empty_store(tmp_path, monkeypatch, migrations):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RCNNOPS_CACHE_DIR", str(tmp_path / "cache"))
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()

    _logged(first)
    assert len(migrations) == 1  # the template, made once
    templates = list((tmp_path / "cache" / "mlflow-store").glob("*.db"))
    assert [p.name.startswith(f"empty-mlflow-{mlflow.__version__}-") for p in templates] == [True]

    monkeypatch.chdir(second)  # a store's default artifact root is ./mlruns
    exp_id, runs = _logged(second)
    assert len(migrations) == 1  # no migrations for the second store
    assert [r.data.metrics for r in runs] == [{"m": 0.5}]
    c = tracking.client()
    # the default experiment is each store's own, not the template's
    assert c.get_experiment("0").artifact_location == str(second / "mlruns" / "0")
    assert c.get_experiment(exp_id).artifact_location == (second / "mlartifacts").as_uri()
    assert [e.name for e in c.search_experiments()] == ["exp", "Default"]


def test_an_existing_store_is_left_as_it_is(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RCNNOPS_CACHE_DIR", str(tmp_path / "cache"))
    _logged(tmp_path)
    db = tmp_path / tracking.DEFAULT_DB
    before = db.read_bytes()
    assert store_template.start_from_template(f"sqlite:///{db}") is False
    assert db.read_bytes() == before
    _, runs = _logged(tmp_path)
    assert len(runs) == 2


def test_without_a_writable_cache_mlflow_makes_the_store(tmp_path, monkeypatch, migrations):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("RCNNOPS_CACHE_DIR", str(blocker))
    project = tmp_path / "p"
    project.mkdir()
    assert store_template.start_from_template(f"sqlite:///{project / 'mlflow.db'}") is False
    assert not (project / "mlflow.db").exists()
    assert list(project.iterdir()) == []  # no partial copy left behind
    _, runs = _logged(project)
    assert len(runs) == 1 and len(migrations) == 1  # MLflow's own, on the store itself
    assert migrations[0].endswith(str(project / "mlflow.db"))
    # and no folder made for a store whose folder does not exist: MLflow's error stands
    monkeypatch.setenv("RCNNOPS_CACHE_DIR", str(tmp_path / "cache"))
    assert store_template.start_from_template(f"sqlite:///{tmp_path / 'no' / 'mlflow.db'}") is False
    assert not (tmp_path / "no").exists() and not (tmp_path / "cache").exists()


def test_a_failed_template_leaves_nothing_behind(tmp_path, monkeypatch):
    """MLflow's migrations failing while the empty store is made: no partial file in
    the cache, no store made from it; MLflow then makes (or fails) the store itself."""
    monkeypatch.setenv("RCNNOPS_CACHE_DIR", str(tmp_path / "cache"))

    def broken(engine):
        with engine.begin() as db:  # half a store on disk, then the failure
            db.exec_driver_sql("CREATE TABLE half (x INTEGER)")
        raise RuntimeError("migration failed")

    monkeypatch.setattr(db_utils, "_initialize_tables", broken)
    with pytest.raises(RuntimeError, match="migration failed"):
        store_template.empty_store()
    assert list((tmp_path / "cache" / "mlflow-store").iterdir()) == []
    assert store_template.start_from_template(f"sqlite:///{tmp_path / 'mlflow.db'}") is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("sqlite:////abs/m.db", "/abs/m.db"),
        ("sqlite:///rel/m.db", "REL"),
        ("sqlite:///:memory:", None),
        ("sqlite:///m.db?timeout=30", None),
        ("sqlite:///file:m.db?mode=ro&uri=true", None),
        ("postgresql://u@h/db", None),
        ("http://127.0.0.1:5000", None),
        ("file:///tmp/mlruns", None),
    ],
)
def test_only_plain_sqlite_files_are_made_from_the_template(uri, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = store_template.sqlite_file(uri)
    if expected == "REL":
        assert found == tmp_path / "rel" / "m.db"
    else:
        assert found == (None if expected is None else tmp_path.__class__(expected))


def test_variants_logging_the_same_new_dataset_at_once_all_succeed(mlflow_db):
    """Variants trained in parallel log the same data as inputs at the same moment.
    MLflow's store looks a dataset up, then inserts it, so all but one insert met
    its unique key and that training failed (a `make test-scale` run:
    train@faster_rcnn, beside train@mask_rcnn). Four runs at once, eight new
    datasets: without the retry, a round fails about every other time."""
    import threading

    import mlflow

    tracking.setup("rcnnops-test")
    failed: list[str] = []
    for r in range(8):
        ready = threading.Barrier(4)
        digest = f"{r:02d}" * 32

        def train(digest=digest, ready=ready) -> None:
            with mlflow.start_run():
                ready.wait()
                try:
                    tracking.log_datasets([("val", "data/prepared/val.json", digest, "eval")])
                except Exception as e:  # noqa: BLE001 - recorded for the assertion
                    failed.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=train) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failed == []
    client = tracking.client()
    exp = client.get_experiment_by_name("rcnnops-test").experiment_id
    runs = client.search_runs([exp])
    assert len(runs) == 32
    digests = {r.inputs.dataset_inputs[0].dataset.digest for r in runs}
    assert len(digests) == 8 and all(len(r.inputs.dataset_inputs) == 1 for r in runs)


def test_adding_to_an_ended_run_keeps_its_status_and_end_time(mlflow_db):
    """Registration logs the model into the training run after the run ended; the
    run keeps the end time and status its stages gave it, also when the addition
    fails (MLflow alone would end it at registration, or mark it FAILED)."""
    import time

    exp_id = tracking.setup("rcnnops-test")
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_metric("loss", 0.5)
    run_id = run.info.run_id
    ended = tracking.client().get_run(run_id).info
    time.sleep(0.01)  # MLflow keeps milliseconds: a new end time would differ
    with tracking.added_to(run_id):
        mlflow.log_param("added", "yes")
    with pytest.raises(RuntimeError, match="log_model failed"), tracking.added_to(run_id):
        raise RuntimeError("log_model failed")
    after = tracking.client().get_run(run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", ended.end_time)
    assert after.data.params == {"added": "yes"}
    assert mlflow.active_run() is None


def test_one_projects_store_does_not_become_the_next_projects(tmp_path, monkeypatch):
    """MLflow exports the URIs it is pointed at; setting up project A must not make
    A's store the store of project B set up next in the same process, nor of the
    processes it starts. A URI the user set stays the one every project uses."""
    import os

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _logged(a)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert tracking.tracking_uri(b) == f"sqlite:///{b.resolve() / 'mlflow.db'}"
    _, runs = _logged(b)
    assert len(runs) == 1 and (b / "mlflow.db").is_file()  # not a second run in a's store
    assert mlflow.get_registry_uri() == f"sqlite:///{b.resolve() / 'mlflow.db'}"

    shared = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared)
    _logged(a)
    _, runs = _logged(b)
    assert len(runs) == 2 and os.environ["MLFLOW_TRACKING_URI"] == shared
    assert "MLFLOW_REGISTRY_URI" not in os.environ
