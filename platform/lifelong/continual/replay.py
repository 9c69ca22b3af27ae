"""The replay buffer: a uniform sample (reservoir sampling) of every row trained on so far.

    <root>/streams/<stream>/replay/state.json            pointer, written last: generation, seen, files added
    <root>/streams/<stream>/replay/buffer-<gen>-<id>.parquet  the rows of that generation (immutable)

Each update writes a new buffer object and then moves the pointer, so a reader (or a crash)
sees the old buffer or the new one, never a mix. The pointer remembers which landing files'
rows went in, so a cycle re-run after a crash does not add them twice. The sampling is
seeded by (seed, rows seen so far): the same stream always gives the same buffer. The pointer
moves by compare-and-swap (`Storage.replace_if`), so of two writers adding at once one wins
and the other is told, rather than one silently dropping the other's rows.
"""

from __future__ import annotations

import json
import random
import uuid

import pyarrow as pa

from lifelong.errors import LifelongError


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
        name = state.get("object", f"buffer-{state['generation']:06d}.parquet")
        return self.storage.read_table(f"{self.dir}/{name}")

    def add(self, table: pa.Table, files: list[str]) -> dict:
        """Offer `table`'s rows (from the landing files `files`) to the reservoir; returns the new state.
        Files already added are skipped whole. Rows stay in Arrow: only slot indices are drawn."""
        read = self.storage.read_versioned(f"{self.dir}/state.json")
        state = json.loads(read[0]) if read else self.state()
        done = set(state["files"])
        if files and set(files) <= done:
            return state
        current = self.rows()
        if current is None:
            current = table.schema.empty_table()
        # slots[i]: the row of concat(current, table) that buffer slot i holds.
        slots = list(range(current.num_rows))
        seen = state["seen"]
        rng = random.Random(f"{self.seed}:{seen}")
        for j in range(table.num_rows):
            seen += 1
            if len(slots) < self.capacity:
                slots.append(current.num_rows + j)
            else:
                r = rng.randrange(seen)  # keep the new row with probability capacity / seen
                if r < self.capacity:
                    slots[r] = current.num_rows + j
        buffer = pa.concat_tables([current.cast(table.schema), table]).take(slots)
        generation = state["generation"] + 1
        # Named per writer: of two racing writers, the pointer's winner names its own rows.
        name = f"buffer-{generation:06d}-{uuid.uuid4().hex[:8]}.parquet"
        self.storage.write_table(f"{self.dir}/{name}", buffer)
        new_state = {"generation": generation, "seen": seen, "files": sorted(done | set(files)), "rows": buffer.num_rows, "object": name}
        pointer = json.dumps(new_state, indent=2, sort_keys=True).encode()
        if not self.storage.replace_if(f"{self.dir}/state.json", pointer, read[1] if read else None):  # the pointer, last
            self.storage.delete(f"{self.dir}/{name}")  # the winner's rows stand; ours were never pointed at
            raise LifelongError(f"the replay buffer of {self.dir} was updated by another writer meanwhile; run the cycle again")
        # Older generations are garbage once the pointer has moved; the one before stays for a
        # reader that read the previous pointer a moment ago.
        keep = {name, state.get("object")}
        for old in self.storage.listdir(self.dir):
            if old.startswith("buffer-") and old not in keep:
                self.storage.delete(f"{self.dir}/{old}")
        return new_state

    def sample(self, n: int, seed: int) -> pa.Table | None:
        """Up to `n` rows drawn without replacement from the buffer (seeded)."""
        samples = self.samples(n, 1, seed)
        return samples[0] if samples else None

    def samples(self, n: int, count: int, seed: int) -> list[pa.Table]:
        """`count` samples of up to `n` rows each (one per epoch of a cycle), drawn without replacement
        from the buffer as far as it reaches: consecutive stretches of one seeded order of its rows,
        which starts again from the top once it is used up, so together they cover
        min(count * n, rows) distinct rows. Empty when the buffer is."""
        current = self.rows()
        if current is None or n <= 0:
            return []
        rows = current.num_rows
        order = random.Random(seed).sample(range(rows), rows)
        take = min(n, rows)
        return [current.take(sorted(order[(i * take + j) % rows] for j in range(take))) for i in range(count)]
