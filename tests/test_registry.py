"""Registry: immutable versions, atomic alias moves under concurrent readers, rollback, history."""

import json
import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lifelong.errors import RegistryError
from lifelong.registry import Registry, parse_ref
from lifelong.storage import Storage


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"pickled bytes must never travel")
    return d


@pytest.fixture
def registry(tmp_path):
    return Registry(Storage(str(tmp_path / "store")))


def test_register_creates_numbered_immutable_versions(registry, model_dir):
    v1 = registry.register_version("m", model_dir, {"task": "causal-lm", "metrics": {"val_loss": 1.0}})
    v2 = registry.register_version("m", model_dir, {"task": "causal-lm", "metrics": {"val_loss": 0.5}})
    assert (v1, v2) == (1, 2)
    card = registry.card("m", 2)
    assert card.metrics == {"val_loss": 0.5} and card.version == 2 and "lifelong" in card.code_version
    files = set(card.files)
    assert "model.safetensors" in files and "config.json" in files
    assert "pytorch_model.bin" not in files  # pickles never enter the registry
    # A version's card is written once: a second writer is refused.
    assert not registry.storage.create_exclusive("registry/m/versions/1/card.json", b"{}")
    assert registry.card("m", 1).metrics == {"val_loss": 1.0}


def test_cards_are_checked_when_written_and_read(registry, model_dir, tmp_path):
    # A card that would not load is refused before a version number is claimed or a file stored.
    for bad, field in (
        ({}, "task"),
        ({"task": "translation"}, "task"),
        ({"task": "causal-lm", "metrics": {"val_loss": "low"}}, "metrics.val_loss"),
    ):
        with pytest.raises(RegistryError, match=rf"new version of m: not a valid card \({field}: "):
            registry.register_version("m", model_dir, bad)
    assert registry.storage.listdir("registry/m/versions") == []
    v = registry.register_version(
        "m", model_dir, {"task": "sequence-classification", "labels": ["a", "b"], "config": {"model": {"max_length": 24}}}
    )
    card = registry.card("m", v)
    assert (card.task, card.labels, card.max_length, card.run, card.exports) == ("sequence-classification", ["a", "b"], 24, None, {})
    # A card written by a newer release (a field this one does not know) still loads and keeps it.
    path = tmp_path / f"store/registry/m/versions/{v}/card.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "lineage": {"from": "elsewhere"}}))
    assert registry.card("m", v).model_dump()["lineage"] == {"from": "elsewhere"}
    # A damaged card is one error naming the file and the field, wherever it is read.
    path.write_text(json.dumps({**stored, "version": "two"}))
    with pytest.raises(RegistryError, match=rf"registry/m/versions/{v}/card.json: not a valid card \(version: "):
        registry.resolve(f"m:{v}")


def test_half_written_version_is_invisible(registry, model_dir):
    registry.register_version("m", model_dir, {"task": "causal-lm"})
    # A crashed writer leaves files but no card: readers do not see it, the next number skips it.
    registry.storage.write_bytes("registry/m/versions/2/model.safetensors", b"partial")
    assert registry.versions("m") == [1]
    assert registry.register_version("m", model_dir, {"task": "causal-lm"}) == 3


def test_concurrent_registrations_get_distinct_versions(registry, model_dir):
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(registry.register_version("m", model_dir, {"task": "causal-lm"}))) for _ in range(6)
    ]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    assert registry.versions("m") == [1, 2, 3, 4, 5, 6]


def test_alias_moves_rollback_and_history(registry, model_dir):
    for _ in range(3):
        registry.register_version("m", model_dir, {"task": "causal-lm"})
    for v in (1, 2, 3):
        registry.move_alias("m", "champion", v)
    assert registry.alias_version("m", "champion") == 3
    assert registry.rollback("m")["version"] == 2
    assert registry.rollback("m")["version"] == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("m")
    history = registry.history("m", "champion")
    assert [(e["kind"], e["version"]) for e in history] == [
        ("promote", 1),
        ("promote", 2),
        ("promote", 3),
        ("rollback", 2),
        ("rollback", 1),
    ]
    assert registry.resolve("m@champion").version == 1


def test_alias_pointer_is_atomic_under_concurrent_readers(registry, model_dir):
    for _ in range(2):
        registry.register_version("m", model_dir, {"task": "causal-lm"})
    registry.move_alias("m", "champion", 1)
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(registry.alias_version("m", "champion"))
            except Exception as e:  # a torn read would show up here as a JSON error
                errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    [t.start() for t in readers]
    for i in range(200):
        registry.move_alias("m", "champion", 1 + i % 2)
    stop.set()
    [t.join() for t in readers]
    assert errors == []
    assert seen == {1, 2}
    assert len(registry.history("m", "champion")) == 201


def test_interrupted_move_leaves_pointer_and_history_consistent(registry, model_dir):
    for _ in range(2):
        registry.register_version("m", model_dir, {"task": "causal-lm"})
    registry.move_alias("m", "champion", 1)
    # A mover that died after writing its event but before the pointer: the event is ignored.
    registry.storage.write_json(
        "registry/m/history/champion/00000002.json", {"alias": "champion", "version": 2, "seq": 2, "kind": "promote", "moved_at": "9999"}
    )
    assert registry.alias_version("m", "champion") == 1
    assert [e["version"] for e in registry.history("m", "champion")] == [1]


def test_references_and_their_errors(registry, model_dir):
    registry.register_version("m", model_dir, {"task": "causal-lm"})
    assert parse_ref("m:1").version == 1 and parse_ref("m@champion").alias == "champion"
    assert registry.resolve("m:1").local_dir.joinpath("model.safetensors").exists()
    assert registry.resolve(str(model_dir)).name is None
    with pytest.raises(RegistryError, match="m:7 does not exist.*versions: 1"):
        registry.resolve("m:7")
    with pytest.raises(RegistryError, match="'m@champion' does not exist"):
        registry.resolve("m@champion")
    with pytest.raises(RegistryError, match="not a model reference"):
        registry.resolve("m@1bad")
    with pytest.raises(RegistryError, match="neither a model reference"):
        registry.resolve("no/such/dir")
    with pytest.raises(RegistryError, match="valid alias"):
        registry.move_alias("m", "bad alias", 1)


def test_registered_weights_load_without_unpickling(registry, model_dir):
    from lifelong.models import load_for_inference

    registry.register_version("m", model_dir, {"task": "causal-lm"})
    model = load_for_inference(registry.resolve("m:1").local_dir, "causal-lm")
    assert torch.equal(model.transformer.wte.weight, GPT2LMHeadModel.from_pretrained(model_dir).transformer.wte.weight)
    card = json.loads((registry.resolve("m:1").local_dir / "card.json").read_text())
    assert card["size_bytes"]["safetensors"] > 0


def test_rollback_follows_the_alias_sequence_not_the_writers_clocks(registry, model_dir, monkeypatch):
    """Three writers whose clocks disagree: the second's is an hour behind. Ordered by time, the
    history put its move first and `rollback` moved champion 3 → 3."""
    import lifelong.registry as registry_module

    for _ in range(3):
        registry.register_version("m", model_dir, {"task": "causal-lm"})
    clocks = iter(
        ["2026-11-29T10:00:00.000+00:00", "2026-11-29T09:00:00.000+00:00", "2026-11-29T10:00:01.000+00:00", "2026-11-29T10:00:02.000+00:00"]
    )
    monkeypatch.setattr(registry_module, "_now", lambda: next(clocks))
    for v in (1, 2, 3):
        registry.move_alias("m", "champion", v)
    assert [e["version"] for e in registry.history("m", "champion")] == [1, 2, 3]
    event = registry.rollback("m")
    assert (event["previous"], event["version"]) == (3, 2)


def test_moves_and_names_that_used_to_raise_tracebacks_get_messages(registry, model_dir):
    from lifelong.errors import AliasConflict

    registry.register_version("m", model_dir, {"task": "causal-lm"})
    with pytest.raises(AliasConflict, match="m@champion is not set; this move expected it at 1"):
        registry.move_alias("m", "champion", 1, expect=1)
    registry.move_alias("m", "champion", 1, expect=None)  # unset, as expected: moves
    for bad in ("m\n", "m\n@champion", "m@champion\n"):
        with pytest.raises(RegistryError, match="not a model reference|not a valid"):
            registry.resolve(bad) if "@" in bad else registry.register_version(bad, model_dir, {"task": "causal-lm"})
    with pytest.raises(RegistryError, match="VERSION must be a number"):
        registry.resolve("m:²")
    with pytest.raises(RegistryError, match="no model named 'nosuch'"):
        registry.rollback("nosuch")
