"""The host's Braze budgets: a small file every worker of a gateway maps (no Redis needed).

With several workers on one host (`workers/`), each worker's `LocalLimiter` reads and writes
the same budgets through this table, so the workers together never start more calls than a
budget has left.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Callable
from typing import Final, TypeVar

from ..rate_budget import MAX_PARTIES, BudgetKey, Party, RateBudget

T = TypeVar("T")

_SLOTS: Final = 4096


_HEAD: Final = struct.Struct("<Qdqqqqq")
_PARTY: Final = struct.Struct("<Qqd")
_RECORD: Final = struct.Struct(_HEAD.format + _PARTY.format[1:] * MAX_PARTIES)


def budgets_path(folder: str) -> str:
    return os.path.join(folder, "budgets")


class HostBudgets:
    """The `RateBudget`s of a host's workers, in a file each of them maps (a `BudgetTable`).

    4,096 slots of (key hash, pause, reset, left, calls under way, limit, ours, and MAX_PARTIES
    (party, its calls under way, when it last waited) for the fair share); every update is one
    read-modify-write under an exclusive `flock` on the file, a few microseconds, so the workers
    together never start more calls than a budget has left. Two keys that hash to one slot take
    it from each other: the one that loses it knows nothing of its budget until its next reply
    (it behaves as at start-up), and nothing is ever invented for the other.
    """

    def __init__(self, path: str) -> None:
        self._file = open(path, "r+b")  # noqa: SIM115 - held for the life of the worker
        self._map = mmap.mmap(self._file.fileno(), _SLOTS * _RECORD.size)
        self._slots: dict[BudgetKey, tuple[int, int]] = {}

    @staticmethod
    def create(path: str) -> None:
        with open(path, "wb") as file:
            file.truncate(_SLOTS * _RECORD.size)

    def _slot(self, key: BudgetKey) -> tuple[int, int]:
        found = self._slots.get(key)
        if found is None:
            digest = hashlib.blake2b(f"{key[0]}\0{key[1]}".encode(), digest_size=8).digest()
            tag = int.from_bytes(digest, "little") or 1  # 0 marks an empty slot
            found = (tag % _SLOTS * _RECORD.size, tag)
            if len(self._slots) < _SLOTS:  # audience pools can be many: the cache stays bounded
                self._slots[key] = found
        return found

    def update(self, key: BudgetKey, change: Callable[[RateBudget], T]) -> T:
        offset, tag = self._slot(key)
        fcntl.flock(self._file, fcntl.LOCK_EX)
        try:
            found, paused, reset, left, under_way, limit, ours, *rest = _RECORD.unpack_from(self._map, offset)
            budget = RateBudget()
            if found == tag:
                parties = [Party(*rest[i : i + 3]) for i in range(0, len(rest), 3) if rest[i]]
                budget = RateBudget(paused, reset, left, under_way, limit, ours, parties)
            result = change(budget)
            kept: list[int | float] = []
            for party in budget.parties[:MAX_PARTIES]:
                kept += (party.party, party.under_way, party.waited)
            kept += (0, 0, 0.0) * (MAX_PARTIES - len(budget.parties[:MAX_PARTIES]))
            _RECORD.pack_into(
                self._map,
                offset,
                tag,
                budget.paused_until,
                budget.reset,
                budget.left,
                budget.under_way,
                budget.limit,
                budget.ours,
                *kept,
            )
            return result
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        self._file.close()
