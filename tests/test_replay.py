"""The replay buffer: bounded, uniform over everything offered, crash-safe, never adds a file twice."""

import pyarrow as pa
import pytest

from lifelong.continual.replay import ReplayBuffer
from lifelong.errors import LifelongError
from lifelong.storage import Storage


def window(w: int, n: int) -> pa.Table:
    return pa.Table.from_pylist([{"text": f"w{w} row {i}", "label": f"c{w}"} for i in range(n)])


def test_reservoir_is_bounded_uniform_and_idempotent_per_file(tmp_path):
    buffer = ReplayBuffer(Storage(str(tmp_path)), "s", capacity=300, seed=0)
    assert buffer.rows() is None and buffer.sample(10, seed=0) is None
    for w in range(4):
        state = buffer.add(window(w, 300), files=[f"hash-{w}"])
    assert {k: state[k] for k in ("generation", "seen", "files", "rows")} == {
        "generation": 4,
        "seen": 1200,
        "files": ["hash-0", "hash-1", "hash-2", "hash-3"],
        "rows": 300,
    }
    labels = buffer.rows().column("label").to_pylist()
    # Uniform over the 1200 rows seen: each window holds about a quarter (75) of the 300 kept.
    counts = {c: labels.count(c) for c in ("c0", "c1", "c2", "c3")}
    assert all(45 <= n <= 105 for n in counts.values()), counts

    again = buffer.add(window(3, 300), files=["hash-3"])  # a cycle re-run after a crash
    assert again == state and buffer.rows().column("label").to_pylist() == labels

    # Only the current generation and the one before are kept in the store.
    objects = sorted(n for n in Storage(str(tmp_path)).listdir("streams/s/replay") if n.startswith("buffer-"))
    assert len(objects) == 2 and objects[-1].startswith("buffer-000004-") and objects[0].startswith("buffer-000003-")

    sample = buffer.sample(50, seed=1)
    assert sample.num_rows == 50 and len(set(sample.column("text").to_pylist())) == 50
    assert sample.equals(buffer.sample(50, seed=1))


def test_the_same_stream_gives_the_same_buffer(tmp_path):
    a = ReplayBuffer(Storage(str(tmp_path / "a")), "s", capacity=50, seed=7)
    b = ReplayBuffer(Storage(str(tmp_path / "b")), "s", capacity=50, seed=7)
    for w in range(3):
        a.add(window(w, 40), [str(w)])
        b.add(window(w, 40), [str(w)])
    assert a.rows().equals(b.rows())


def test_of_two_writers_adding_at_once_one_wins_and_the_other_is_told(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    a = ReplayBuffer(storage, "s", capacity=50, seed=0)
    b = ReplayBuffer(storage, "s", capacity=50, seed=0)
    a.add(window(0, 20), ["w0"])
    # b reads the pointer, then a moves it before b writes: b's compare-and-swap must fail.
    real = storage.read_versioned

    def read_then_let_a_in(rel):
        got = real(rel)
        monkeypatch.setattr(storage, "read_versioned", real)
        a.add(window(1, 20), ["w1"])
        return got

    monkeypatch.setattr(storage, "read_versioned", read_then_let_a_in)
    with pytest.raises(LifelongError, match="updated by another writer meanwhile"):
        b.add(window(2, 20), ["w2"])
    state = a.state()
    assert state["files"] == ["w0", "w1"] and state["seen"] == 40  # a's rows kept, b's not half-applied
    assert sorted(set(a.rows().column("label").to_pylist())) == ["c0", "c1"]
    # The loser's buffer object, never pointed at, is gone.
    assert sorted(n[:13] for n in storage.listdir("streams/s/replay") if n.startswith("buffer-")) == ["buffer-000001", "buffer-000002"]


def test_a_sample_per_epoch_draws_distinct_rows_that_together_cover_what_the_buffer_holds(tmp_path):
    buffer = ReplayBuffer(Storage(str(tmp_path)), "s", capacity=100, seed=0)
    assert buffer.samples(10, 3, seed=0) == []
    buffer.add(window(0, 100), files=["w0"])
    samples = buffer.samples(40, 3, seed=5)
    texts = [s.column("text").to_pylist() for s in samples]
    assert [len(t) for t in texts] == [40, 40, 40] and all(len(set(t)) == 40 for t in texts)
    # 120 draws from 100 rows: every row once, and 20 of them a second time.
    assert len(set().union(*texts)) == 100 and len(set(texts[0]) & set(texts[1])) == 0
    assert [s.equals(t) for s, t in zip(samples, buffer.samples(40, 3, seed=5))] == [True] * 3
    assert buffer.sample(40, seed=5).equals(samples[0])
    # More rows asked than the buffer holds: every sample is the whole buffer.
    assert [s.num_rows for s in buffer.samples(500, 2, seed=1)] == [100, 100]
