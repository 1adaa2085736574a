"""The running batch's KV cache: one preallocated tensor, one slot per running request.

Layout: ``kv`` is ``(L, 2, Bcap, Hkv, Tcap, D)`` (layer, key/value, slot, kv head, position, head
dim). Slots ``0..n-1`` are the running requests in order; slot ``i`` holds ``lengths[i]`` valid
positions, the rest of its row is garbage that attention masks out. Capacity grows geometrically
(a copy, amortised); a finished request is removed by moving the last slot into its place, so the
live slots stay dense (the paper's KV-cache compaction) without shifting the whole batch. A step
that decodes only some requests first swaps them into the leading slots, so decode attention always
reads a prefix ``kv[:, :, :k]``.
"""

from __future__ import annotations

import torch


class KVBudgetExceeded(ValueError):
    """A batch would need more KV cache than the budget allows."""


class KVCache:
    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device, max_context: int
    ) -> None:
        self.geometry = (layers, kv_heads, head_dim)
        self.dtype, self.device, self.max_context = dtype, device, max_context
        self.kv = torch.zeros(layers, 2, 0, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.lengths: list[int] = []  # valid positions per live slot
        self.lengths_t = torch.zeros(0, dtype=torch.int64, device=device)  # same, on the device
        self.budget: int | None = None  # most slots x positions it may hold (None: no limit)

    @property
    def bytes_per_position(self) -> int:
        layers, kv_heads, head_dim = self.geometry
        return layers * 2 * kv_heads * head_dim * self.kv.element_size()

    @property
    def size(self) -> int:
        return len(self.lengths)

    def reserve(self, slots: int, positions: int) -> None:
        """Make room for ``slots`` live slots of up to ``positions`` positions each."""
        if positions > self.max_context:
            raise ValueError(f"{positions} positions exceed max_context {self.max_context}")
        _, _, bcap, _, tcap, _ = self.kv.shape
        if slots <= bcap and positions <= tcap:
            return
        if self.budget is not None and slots * positions > self.budget:
            raise KVBudgetExceeded(
                f"{slots} requests of up to {positions} positions exceed the KV-cache budget of {self.budget} positions"
            )
        new_b = max(slots, bcap, min(2 * bcap, slots + 32)) if slots > bcap else bcap
        new_t = tcap
        if positions > tcap:
            new_t = min(self.max_context, max(positions + 64, 2 * tcap))
        if self.budget is not None and new_b * new_t > self.budget:  # grow only as far as the budget
            new_b = max(slots, self.size)
            new_t = max(positions, min(new_t, self.budget // new_b))
        layers, kv_heads, head_dim = self.geometry
        grown = torch.zeros(layers, 2, new_b, kv_heads, new_t, head_dim, dtype=self.dtype, device=self.device)
        n, used_t = self.size, max(self.lengths, default=0)
        grown[:, :, :n, :, :used_t] = self.kv[:, :, :n, :, :used_t]
        self.kv = grown
        lengths_t = torch.zeros(new_b, dtype=torch.int64, device=self.device)
        lengths_t[:n] = self.lengths_t[:n]
        self.lengths_t = lengths_t

    def add_slots(self, lengths: list[int]) -> int:
        """Append slots with the given lengths (their KV is written by the model); return the first."""
        first = self.size
        self.reserve(first + len(lengths), max(lengths, default=1))
        self.lengths.extend(lengths)
        self.lengths_t[first : first + len(lengths)] = torch.tensor(lengths, dtype=torch.int64)
        return first

    def truncate(self, size: int) -> None:
        """Forget slots ``size..`` (a prefill that failed half-way)."""
        del self.lengths[size:]

    def advance(self, count: int | None = None, by: int = 1) -> None:
        """Slots ``0..count-1`` (default: every live slot) gained one position (a decode step wrote
        it); ``by=-1`` takes it back (the step is undone: the position is garbage again)."""
        count = self.size if count is None else count
        self.lengths[:count] = [n + by for n in self.lengths[:count]]
        self.lengths_t[:count] += by

    def extend(self, slot: int, count: int) -> None:
        """Slot ``slot`` gained ``count`` positions (a prompt chunk wrote them)."""
        self.lengths[slot] += count
        self.lengths_t[slot] += count

    def swap(self, pairs: list[tuple[int, int]]) -> None:
        """Exchange the contents of live slots ``i`` and ``j`` for each pair: three copies of the
        pair's valid positions (on CPU ~5x faster than one indexed copy of all pairs at once)."""
        for i, j in pairs:
            n = max(self.lengths[i], self.lengths[j])
            held = self.kv[:, :, i, :, :n].clone()
            self.kv[:, :, i, :, :n] = self.kv[:, :, j, :, :n]
            self.kv[:, :, j, :, :n] = held
            self.lengths[i], self.lengths[j] = self.lengths[j], self.lengths[i]
            self.lengths_t[[i, j]] = self.lengths_t[[j, i]]

    def remove(self, slot: int) -> None:
        """Drop a slot; the last slot moves into its place."""
        last = self.size - 1
        if slot != last:
            n = self.lengths[last]
            self.kv[:, :, slot, :, :n] = self.kv[:, :, last, :, :n]
            self.lengths[slot] = n
            self.lengths_t[slot] = n
        self.lengths.pop()

    def read(self, slot: int) -> torch.Tensor:
        """A copy of one slot's valid KV: (L, 2, Hkv, T, D)."""
        return self.view(slot).clone()

    def view(self, slot: int) -> torch.Tensor:
        """One slot's valid KV in place, (L, 2, Hkv, T, D) strided: valid until the batch changes."""
        return self.kv[:, :, slot, :, : self.lengths[slot]]

    def append(self, kv: torch.Tensor) -> int:
        """Add a slot holding ``kv`` (L, 2, Hkv, T, D); return its index."""
        if tuple(kv.shape[i] for i in (0, 2, 4)) != self.geometry or kv.shape[1] != 2:
            raise ValueError(f"KV of shape {tuple(kv.shape)} does not fit a cache of geometry {self.geometry}")
        slot = self.add_slots([kv.shape[3]])
        self.kv[:, :, slot, :, : kv.shape[3]] = kv.to(device=self.device, dtype=self.dtype)
        return slot
