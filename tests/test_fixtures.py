"""The repo's copy of Braze's documented examples matches shared/braze/examples when present."""

from __future__ import annotations

import pytest
from conftest import EXAMPLES, SHARED_EXAMPLES


def test_fixture_copy_is_current() -> None:
    if not SHARED_EXAMPLES.is_dir():
        pytest.skip("shared/braze/examples is not beside this clone")
    shared = {p.name: p.read_bytes() for p in SHARED_EXAMPLES.glob("*.json")}
    ours = {p.name: p.read_bytes() for p in EXAMPLES.glob("*.json")}
    assert ours == shared
