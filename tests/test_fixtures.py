"""docs/braze, the repo's copy of the Braze contract and examples, matches shared/braze when present."""

from __future__ import annotations

import pytest
from conftest import BRAZE_DOCS, SHARED_BRAZE


def test_the_copy_of_the_braze_contract_is_current() -> None:
    if not SHARED_BRAZE.is_dir():
        pytest.skip("shared/braze is not beside this clone")
    shared = {p.relative_to(SHARED_BRAZE): p.read_bytes() for p in SHARED_BRAZE.rglob("*") if p.is_file()}
    ours = {p.relative_to(BRAZE_DOCS): p.read_bytes() for p in BRAZE_DOCS.rglob("*") if p.is_file()}
    assert ours == shared
