"""The replay buffer: a uniform sample (reservoir sampling) of every row trained on so far.

    <root>/streams/<stream>/replay/state.json            pointer, written last: generation, seen, files added
    <root>/streams/<stream>/replay/buffer-<gen>.parquet  the rows of that generation (immutable)

Each update writes a new buffer object and then moves the pointer, so a reader (or a crash)
sees the old buffer or the new one, never a mix. The pointer remembers which landing files'
rows went in, so a cycle re-run after a crash does not add them twice. The sampling is
seeded by (seed, rows seen so far): the same stream always gives the same buffer.
"""

from __future__ import annotations

import io
import random

import pyarrow as pa
import pyarrow.parquet as pq


class ReplayBuffer:
    def __init__(self, storage, stream: str, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"the replay buffer needs a capacity of at least 1 row (got {capacity})")
        self.storage, self.capacity, self.seed = storage, capacity, seed
        self.dir = f"streams/{stream}/replay"

    def state(self) -> dict:
        rel = f"{self.dir}/state.json"
        return self.storage.read_json(rel) if self.storage.exists(rel) else {"generation": 0, "seen": 0, "files": [], "rows": 0}

    def rows(self) -> pa.Table | None:
        state = self.state()
        if not state["generation"]:
            return None
        return pq.read_table(io.BytesIO(self.storage.read_bytes(f"{self.dir}/buffer-{state['generation']:06d}.parquet")))

    def add(self, table: pa.Table, files: list[str]) -> dict:
        """Offer `table`'s rows (from the landing files `files`) to the reservoir; returns the new state.
        Files already added are skipped whole."""
        state = self.state()
        done = set(state["files"])
        if files and set(files) <= done:
            return state
        current = self.rows()
        buffer = current.to_pylist() if current is not None else []
        seen = state["seen"]
        rng = random.Random(f"{self.seed}:{seen}")
        for row in table.to_pylist():
            seen += 1
            if len(buffer) < self.capacity:
                buffer.append(row)
            else:
                j = rng.randrange(seen)  # keep the new row with probability capacity / seen
                if j < self.capacity:
                    buffer[j] = row
        generation = state["generation"] + 1
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(buffer, schema=table.schema), sink)
        self.storage.write_bytes(f"{self.dir}/buffer-{generation:06d}.parquet", sink.getvalue())
        new_state = {"generation": generation, "seen": seen, "files": sorted(done | set(files)), "rows": len(buffer)}
        self.storage.write_json(f"{self.dir}/state.json", new_state)  # the pointer, last
        return new_state

    def sample(self, n: int, seed: int) -> pa.Table | None:
        """Up to `n` rows drawn without replacement from the buffer (seeded)."""
        current = self.rows()
        if current is None or n <= 0:
            return None
        picks = sorted(random.Random(seed).sample(range(current.num_rows), min(n, current.num_rows)))
        return current.take(picks)
