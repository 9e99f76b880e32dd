"""Hypothesis strategies for what nobody here would write: any JSON value, nested, with the
strings a given surface is most likely to mishandle mixed in."""
from __future__ import annotations

from hypothesis import strategies as st


def json_values(specials: list[str], *, nonfinite: bool, text_size: int, key_size: int, max_leaves: int):
    """Any JSON value (floats with NaN and infinities where the reader must refuse them), `specials` among the strings."""
    return st.recursive(
        st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
        | st.floats(allow_nan=nonfinite, allow_infinity=nonfinite) | st.text(max_size=text_size)
        | st.sampled_from(specials),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=key_size), inner, max_size=3),
        max_leaves=max_leaves)
