"""A memo that cannot grow without bound: the hot path's small caches (plans per key, header
values, Redis key names, refused key hashes) are keyed by what callers send, so each one empties
itself when full rather than growing with every new key or value an attacker makes up. Emptying
all at once (not LRU) keeps hits at plain dict speed: only a miss, which pays for an insert
anyway, runs the size check here."""
from __future__ import annotations


class BoundedDict(dict):
    __slots__ = ("cap",)

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def __setitem__(self, key, value) -> None:
        if len(self) >= self.cap:
            self.clear()
        dict.__setitem__(self, key, value)
