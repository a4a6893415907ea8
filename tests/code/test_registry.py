"""The promotion gate against a real (temporary) MLflow SQLite store."""

import pytest

from rcnnops import registry, tracking

NAME = "rcnnops-faster_rcnn"


@pytest.fixture
def store(mlflow_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracking.setup("gate-test")
    client = tracking.client()
    client.create_registered_model(NAME)

    def add(ap: float | None, val_hash: str = "v1") -> str:
        tags = {"val_hash": val_hash, "variant": "faster_rcnn"}
        if ap is not None:
            tags["metric.bbox_AP"] = str(ap)
        (tmp_path / "m").mkdir(exist_ok=True)
        mv = client.create_model_version(NAME, source=(tmp_path / "m").as_uri(), tags=tags)
        return str(mv.version)

    return add


def _champion():
    mv = registry.get_alias(NAME, registry.CHAMPION)
    return None if mv is None else str(mv.version)


def _promote(version, **kw):
    return registry.promote("faster_rcnn", version, experiment="gate-test", actor="test", **kw)


def test_gate_decision_table(store):
    v1 = store(0.50)
    d = _promote(v1)
    assert d.promoted and "first version" in d.reason and _champion() == v1

    v2 = store(0.60)  # better
    assert _promote(v2).promoted and _champion() == v2

    v3 = store(0.60)  # equal: not better
    d = _promote(v3)
    assert not d.promoted and "does not beat" in d.reason and _champion() == v2

    v4 = store(0.40)  # worse
    assert not _promote(v4).promoted and _champion() == v2

    v5 = store(0.99, val_hash="other")  # better, but on other validation data
    d = _promote(v5)
    assert not d.promoted and "validation data differs" in d.reason and _champion() == v2

    d = _promote(v4, force=True)
    assert d.promoted and d.reason == "forced by the user" and _champion() == v4

    # --force on the current champion is a no-op that says so, and leaves the audit
    # trail as it was: rollback still goes back to v2, not to v4 itself.
    d = _promote(v4, force=True)
    assert (
        not d.promoted and d.reason == f"version {v4} is already champion (--force changes nothing)"
    )
    assert registry.get_version(NAME, v4).tags["promotion.champion_before"] == v2
    back = registry.rollback("faster_rcnn", experiment="gate-test")
    assert (back.from_version, back.to_version) == (v4, v2) and _champion() == v2


def test_min_improvement(store):
    v1, v2 = store(0.50), store(0.505)
    _promote(v1)
    assert not _promote(v2, min_improvement=0.01).promoted
    assert _promote(v2, min_improvement=0.001).promoted


def test_unevaluated_version_is_never_promoted(store):
    v1 = store(None)
    d = _promote(v1)
    assert not d.promoted and _champion() is None


def test_decision_is_recorded_on_the_version(store):
    v1, v2 = store(0.5), store(0.4)
    _promote(v1)
    _promote(v2)
    tags = tracking.client().get_model_version(NAME, v2).tags
    assert tags["promotion.decision"] == "kept"
    assert "does not beat champion v1" in tags["promotion.reason"]
    assert tags["promotion.by"] == "test" and tags["promotion.champion_before"] == v1


def test_repromoting_the_champion_keeps_its_audit_trail(store):
    v1 = store(0.5)
    _promote(v1)
    d = _promote(v1)
    assert not d.promoted and "already champion" in d.reason
    assert tracking.client().get_model_version(NAME, v1).tags["promotion.decision"] == "promoted"


def test_missing_version_is_a_clear_error(store):
    with pytest.raises(ValueError, match="has no version 42"):
        _promote("42")


def _history(version):
    import json

    tags = registry.get_version(NAME, version).tags
    return [json.loads(tags[f"promotion.{i}"]) for i in range(1, int(tags["promotion.count"]) + 1)]


def test_every_decision_is_kept_in_the_versions_history(store):
    v1, v2 = store(0.50), store(0.40)
    _promote(v1)
    assert not _promote(v2).promoted  # worse: kept
    assert _promote(v2, force=True).promoted  # then forced
    assert [(h["decision"], h["champion_before"]) for h in _history(v2)] == [
        ("kept", v1),
        ("promoted", v1),
    ]
    assert _history(v2)[0]["reason"].startswith("bbox_AP 0.4000 does not beat")
    tags = registry.get_version(NAME, v2).tags
    assert (
        tags["promotion.decision"] == "promoted"
        and tags["promotion.reason"] == "forced by the user"
    )


def test_a_failed_tag_write_moves_nothing_and_a_retry_completes(store, monkeypatch):
    """The decision is written before champion moves: a store failure while
    recording leaves the old champion in place (and its audit trail intact)."""
    from rcnnops.registry import gate

    v1, v2 = store(0.50), store(0.60)
    _promote(v1)
    real = gate._set_tags

    def flaky(name, version, tags):
        if "promotion.decision" in tags:
            raise ConnectionError("tracking server hiccup")
        real(name, version, tags)

    monkeypatch.setattr(gate, "_set_tags", flaky)
    with pytest.raises(ConnectionError):
        _promote(v2)
    assert _champion() == v1
    monkeypatch.setattr(gate, "_set_tags", real)
    d = _promote(v2)  # the retry decides (the half-written record is replaced)
    assert d.promoted and _champion() == v2
    assert [h["decision"] for h in _history(v2)] == ["promoted"]
    assert registry.get_version(NAME, v2).tags["promotion.champion_before"] == v1
    back = registry.rollback("faster_rcnn", experiment="gate-test")
    assert (back.from_version, back.to_version) == (v2, v1)


def test_an_interrupted_alias_move_is_completed_not_redecided(store, monkeypatch):
    """Decision recorded, then the alias move fails: the version is `promoting`
    (not decided, so the flow promotes it again), and the retry only moves the
    alias, adding no second decision."""
    from rcnnops.registry import gate
    from rcnnops.registry.store import is_decided

    v1, v2 = store(0.50), store(0.60)
    _promote(v1)
    real = gate._move_champion

    def fail(*args):
        raise ConnectionError("tracking server hiccup")

    monkeypatch.setattr(gate, "_move_champion", fail)
    with pytest.raises(ConnectionError):
        _promote(v2)
    tags = registry.get_version(NAME, v2).tags
    assert _champion() == v1 and tags["promotion.decision"] == "promoting"
    assert not is_decided(tags)
    monkeypatch.setattr(gate, "_move_champion", real)
    d = _promote(v2)
    assert d.promoted and "completing an interrupted promotion" in d.reason
    assert _champion() == v2
    assert [h["decision"] for h in _history(v2)] == ["promoted"]
    assert is_decided(registry.get_version(NAME, v2).tags)
