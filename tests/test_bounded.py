"""The hot path's memos (common/bounded.py) stay bounded whatever keys callers make up."""
from __future__ import annotations

from hypothesis import given, strategies as st

from common.bounded import BoundedDict


@given(st.integers(1, 20), st.lists(st.integers(0, 60), max_size=300))
def test_never_past_its_cap_and_the_last_insert_is_kept(cap, keys):
    d = BoundedDict(cap)
    for k in keys:
        d[k] = k * 2
        assert len(d) <= cap and d[k] == k * 2
    assert set(d) <= set(keys)


def test_chained_assignment_and_hits_are_plain_dict():
    d = BoundedDict(2)
    v = d["a"] = 1
    assert v == 1 and d.get("a") == 1 and d.get("b") is None
    d["b"] = 2
    d["c"] = 3          # full: emptied, then c
    assert dict(d) == {"c": 3}
