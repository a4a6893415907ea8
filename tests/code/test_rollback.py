"""Rollback from the audit trail, racing promotions, and bad registry requests,
against a real (temporary) MLflow SQLite store."""

import json
import threading
import time

import pytest

from rcnnops import registry, tracking
from rcnnops.cli import main

NAME = "rcnnops-faster_rcnn"
EXP = "gate-test"


@pytest.fixture
def store(mlflow_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracking.setup(EXP)
    client = tracking.client()
    client.create_registered_model(NAME)
    (tmp_path / "m").mkdir()

    def add(ap: float) -> str:
        tags = {"val_hash": "v1", "variant": "faster_rcnn", "metric.bbox_AP": str(ap)}
        mv = client.create_model_version(NAME, source=(tmp_path / "m").as_uri(), tags=tags)
        return str(mv.version)

    return add


def _champion() -> str | None:
    mv = registry.get_alias(NAME, registry.CHAMPION)
    return None if mv is None else str(mv.version)


def _promote(version, **kw):
    return registry.promote("faster_rcnn", version, experiment=EXP, actor="test", **kw)


def _tags(version):
    return tracking.client().get_model_version(NAME, version).tags


def test_rollback_walks_back_the_audit_trail(store):
    v1, v2, v3 = store(0.5), store(0.6), store(0.7)
    for v in (v1, v2, v3):
        assert _promote(v).promoted
    r = registry.rollback("faster_rcnn", actor="ops", experiment=EXP)
    assert (r.from_version, r.to_version) == (v3, v2) and _champion() == v2
    assert _tags(v3)["rollback.demoted_to"] == v2 and _tags(v3)["rollback.demoted_by"] == "ops"
    assert _tags(v2)["rollback.restored_from"] == v3
    assert _tags(v3)["promotion.decision"] == "promoted"  # the promotion record is kept
    row = next(r for r in registry.list_versions() if r["version"] == v3)
    assert row["decision"] == f"promoted, rolled back to v{v2}"

    assert registry.rollback("faster_rcnn", experiment=EXP).to_version == v1
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback("faster_rcnn", experiment=EXP)
    assert _champion() == v1  # the failed rollback changed nothing


def test_a_version_promoted_again_after_its_rollback_is_not_shown_rolled_back(store):
    """v2 promoted, rolled back to v1, then promoted again: `rcnnops models` and its
    description said "promoted, rolled back to v1" of the champion."""
    v1, v2 = store(0.5), store(0.6)
    _promote(v1)
    _promote(v2)
    registry.rollback("faster_rcnn", experiment=EXP)
    row = next(r for r in registry.list_versions() if r["version"] == v2)
    assert row["decision"] == f"promoted, rolled back to v{v1}"
    assert f"Rolled back to v{v1}" in tracking.client().get_model_version(NAME, v2).description
    assert _promote(v2).promoted and _champion() == v2
    row = next(r for r in registry.list_versions() if r["version"] == v2)
    assert row["decision"] == "promoted"
    assert "Rolled back" not in tracking.client().get_model_version(NAME, v2).description
    assert _tags(v2)["rollback.demoted_to"] == v1  # the rollback stays in the record


def test_a_version_typed_with_a_leading_zero_is_the_same_version(store):
    """``rcnnops promote faster_rcnn 03`` with v3 champion: "already champion",
    nothing recorded. It used to record v3 as kept with itself as the champion
    before it, and each rollback then went from v3 to v3, forever."""
    v1, v2 = store(0.5), store(0.6)
    _promote(v1)
    assert _promote(v2).promoted
    before = _tags(v2)
    d = _promote(f"0{v2}")
    assert (d.promoted, d.version) == (False, v2) and _tags(v2) == before
    assert registry.rollback("faster_rcnn", experiment=EXP).to_version == v1
    client = tracking.client()  # a record no promotion writes any more: refused, not looped
    client.set_model_version_tag(NAME, v1, "promotion.champion_before", v1)
    with pytest.raises(registry.RegistryError, match=f"v{v1} names itself"):
        registry.rollback("faster_rcnn", experiment=EXP)
    assert _champion() == v1


def test_rollback_without_champion_or_model_is_a_clear_error(store):
    store(0.5)
    with pytest.raises(registry.RegistryError, match="has no champion"):
        registry.rollback("faster_rcnn", experiment=EXP)
    with pytest.raises(registry.RegistryError, match="no registered model rcnnops-rcnn"):
        registry.rollback("rcnn", experiment=EXP)


def test_rollback_to_a_deleted_version_changes_nothing(store):
    v1, v2 = store(0.5), store(0.6)
    _promote(v1)
    _promote(v2)
    tracking.client().delete_model_version(NAME, v1)
    with pytest.raises(registry.RegistryError, match=f"previous champion v{v1} no longer exists"):
        registry.rollback("faster_rcnn", experiment=EXP)
    assert _champion() == v2


def test_cli_rollback_models_and_bad_requests_exit_2(store, tiny_project, capsys):
    (tiny_project / "params.yaml").write_text(
        (tiny_project / "params.yaml").read_text().replace("rcnnops-test", EXP)
    )
    v1, v2 = store(0.5), store(0.6)
    _promote(v1)
    _promote(v2)
    args = ["-C", str(tiny_project)]
    assert main([*args, "rollback", "faster_rcnn"]) == 0
    assert f"rolled back from v{v2} to v{v1}" in capsys.readouterr().out
    for argv, message in (
        (["rollback", "faster_rcnn"], "no previous champion"),
        (["promote", "faster_rcnn", "99"], "has no version 99"),
        (["promote", "rcnn", "1"], "no registered model rcnnops-rcnn"),
        (["serve", "faster_rcnn", "--alias", "canary"], "has no alias 'canary'"),
        (["predict", "faster_rcnn", "nothing.png"], "nothing.png: image file not found"),
    ):
        assert main([*args, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert _champion() == v1
    assert main([*args, "models"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    for col in ("bbox_AP", "segm_AP", "decision", "git_commit", "data_hash", "params_hash"):
        assert col in header


def _race(versions: list[str]) -> dict:
    """Promote ``versions`` from as many threads, released at the same instant."""
    barrier = threading.Barrier(len(versions))
    results, errors = {}, []

    def run(version):
        try:
            barrier.wait()
            results[version] = _promote(version)
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_racing_promotions_leave_one_consistent_champion(store):
    """Two better versions promoted at the same moment, five times over: the
    lock makes the second decide against the first's result, so the best one is
    champion and the audit trail (champion_before) is a chain of real champions."""
    for _round in range(5):
        base = store(0.5)
        _promote(base, force=True)
        a, b = store(0.6), store(0.7)
        results = _race([a, b])
        assert _champion() == b  # the best, whatever the order
        befores = {v: _tags(v)["promotion.champion_before"] for v in (a, b)}
        if results[a].promoted:  # a went first, then b beat a
            assert befores == {a: base, b: a}
        else:  # b went first; a was compared with b and kept
            assert befores == {a: b, b: base} and "does not beat" in results[a].reason


def test_lock_file_sits_next_to_a_local_store(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert registry.lock_path(db) == tmp_path / "mlflow.db.registry.lock"
    assert registry.lock_path("http://mlflow.example:5000") is None
    assert (
        registry.lock_path(f"file://{tmp_path}/mlruns")
        == tmp_path / "mlruns/.rcnnops-registry.lock"
    )


def test_an_interrupted_rollback_is_completed_not_repeated(store, monkeypatch):
    """Killed after the alias moved, a rollback left no record; run again, it
    rolled back a second step (v3 -> v2 -> v1)."""
    from rcnnops.registry import rollbacks as moves

    v1, v2, v3 = store(0.5), store(0.6), store(0.7)
    for v in (v1, v2, v3):
        assert _promote(v).promoted
    with monkeypatch.context() as killed:
        killed.setattr(moves, "_record_rollback", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            registry.rollback("faster_rcnn", experiment=EXP)
    assert _champion() == v2 and "rollback.demoted_at" not in _tags(v3)
    assert _tags(v3)["rollback.pending_to"] == v2
    r = registry.rollback("faster_rcnn", actor="ops", experiment=EXP)
    assert (r.from_version, r.to_version, r.completed) == (v3, v2, True) and _champion() == v2
    assert _tags(v3)["rollback.demoted_to"] == v2 and "rollback.pending_to" not in _tags(v3)
    assert _tags(v2)["rollback.restored_from"] == v3
    assert registry.rollback("faster_rcnn", experiment=EXP).to_version == v1  # one more step
    # killed before the alias moved: forgotten, and the rollback runs as asked
    v4 = store(0.8)
    assert _promote(v4).promoted
    with monkeypatch.context() as killed:
        killed.setattr(moves, "_move_champion", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            registry.rollback("faster_rcnn", experiment=EXP)
    r = registry.rollback("faster_rcnn", experiment=EXP)
    assert (r.from_version, r.to_version, r.completed) == (v4, v1, False)
    assert "rollback.pending_to" not in _tags(v4)


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_a_partial_rollback_record_is_read_and_its_version_promotable(store, capsys):
    """Killed between two of its tags, a rollback left demoted_at without
    demoted_to: `models` and every later promote of that version raised KeyError."""
    v1, v2 = store(0.5), store(0.6)
    assert _promote(v1).promoted and _promote(v2).promoted
    tracking.client().set_registered_model_alias(NAME, registry.CHAMPION, v1)
    tracking.client().set_model_version_tag(NAME, v2, "rollback.demoted_at", "2026-12-03")
    row = next(r for r in registry.list_versions() if r["version"] == v2)
    assert row["decision"] == "promoted, rolled back to v?"
    assert _promote(v2).promoted and _champion() == v2


def test_a_rolled_back_forced_promotion_is_not_completed_later(store, monkeypatch):
    """Interrupted after its alias move, a forced promotion of a worse version kept
    its `promoting` record through a rollback; a later plain promote then
    'completed' it: the worse version was champion again with no --force."""
    from rcnnops.registry import gate

    good, worse = store(0.7), store(0.3)
    assert _promote(good).promoted
    with monkeypatch.context() as killed:
        killed.setattr(gate, "_finish", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            _promote(worse, force=True)
    assert _champion() == worse and _tags(worse)["promotion.decision"] == "promoting"
    assert registry.rollback("faster_rcnn", experiment=EXP).to_version == good
    assert _tags(worse)["promotion.decision"] == "promoted"  # the record was finished
    again = _promote(worse)
    assert not again.promoted and "does not beat" in again.reason and _champion() == good


def test_a_promotion_overwritten_on_a_remote_store_is_decided_again(store, monkeypatch):
    """MLflow has no compare-and-set of an alias: on a server store another
    promotion's move can land after this one read its own back. Both then said
    'promoted' while the worse one was champion."""
    from rcnnops.registry import gate

    base, a, b = store(0.5), store(0.6), store(0.7)
    assert _promote(base).promoted
    monkeypatch.setattr(gate, "lock_path", lambda: None)  # as for a server store
    late = []

    def settle(seconds):  # b's move lands while a waits
        if not late:
            late.append(seconds)
            tracking.client().set_registered_model_alias(NAME, registry.CHAMPION, b)

    monkeypatch.setattr(gate.time, "sleep", settle)
    d = _promote(a)
    assert late == [gate.SETTLE_S] and _champion() == b
    assert not d.promoted and d.champion_before == b and "does not beat" in d.reason
    # a was champion for that moment (a promotion decided then names it): its
    # history says so, then the decision taken again
    history = [json.loads(_tags(a)[f"promotion.{n}"]) for n in (1, 2)]
    assert [(h["decision"], h["champion_before"]) for h in history] == [
        ("promoted", base),
        ("kept", b),
    ]


def test_the_lock_is_the_store_files_whatever_the_link_to_it_is_named(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "team.db").touch()
    (tmp_path / "mlflow.db").symlink_to(shared / "team.db")
    assert registry.lock_path(f"sqlite:///{tmp_path / 'mlflow.db'}") == (
        shared / "team.db.registry.lock"
    )


def test_a_promotion_waiting_for_the_lock_says_so(store, capsys):
    from rcnnops.lock import flocked

    v1 = store(0.5)
    path = registry.lock_path()
    with flocked(path):
        waiter = threading.Thread(target=_promote, args=(v1,))
        waiter.start()
        deadline = time.monotonic() + 30
        while "waiting for" not in capsys.readouterr().err:
            assert time.monotonic() < deadline, "no word while waiting"
    waiter.join(timeout=60)
    assert _champion() == v1
