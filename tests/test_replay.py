"""The replay buffer: bounded, uniform over everything offered, crash-safe, never adds a file twice."""

import pyarrow as pa

from lifelong.continual.replay import ReplayBuffer
from lifelong.storage import Storage


def window(w: int, n: int) -> pa.Table:
    return pa.Table.from_pylist([{"text": f"w{w} row {i}", "label": f"c{w}"} for i in range(n)])


def test_reservoir_is_bounded_uniform_and_idempotent_per_file(tmp_path):
    buffer = ReplayBuffer(Storage(str(tmp_path)), "s", capacity=300, seed=0)
    assert buffer.rows() is None and buffer.sample(10, seed=0) is None
    for w in range(4):
        state = buffer.add(window(w, 300), files=[f"hash-{w}"])
    assert state == {"generation": 4, "seen": 1200, "files": ["hash-0", "hash-1", "hash-2", "hash-3"], "rows": 300}
    labels = buffer.rows().column("label").to_pylist()
    # Uniform over the 1200 rows seen: each window holds about a quarter (75) of the 300 kept.
    counts = {c: labels.count(c) for c in ("c0", "c1", "c2", "c3")}
    assert all(45 <= n <= 105 for n in counts.values()), counts

    again = buffer.add(window(3, 300), files=["hash-3"])  # a cycle re-run after a crash
    assert again == state and buffer.rows().column("label").to_pylist() == labels

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
