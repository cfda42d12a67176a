"""The tenants file's [workspaces.<name>] tables: each a Braze workspace's policy
(`rate_budget.WorkspacePolicy`): the ceiling of its calls and the reserves of its lanes.

Read with the tenants (`tenants.load_tenants`), which name their workspace by it.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError
from .rate_budget import WorkspacePolicy

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # as a tenant's id
_WORKSPACE_FIELDS = frozenset({"ceiling", "reserve", "transactional_reserve"})


def parse_workspace(name: str, entry: Any) -> WorkspacePolicy:
    """One [workspaces.<name>] table: `ceiling` (calls per window, or a share of
    x-ratelimit-limit), `reserve` and `transactional_reserve` (calls, or shares)."""
    where = f"workspace {name!r}"
    if not _NAME.match(name) or name.startswith("auto-"):
        raise ConfigError(f"{where}: names are 1-63 of a-z, 0-9, _ and -, not starting auto-")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(entry) - _WORKSPACE_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {', '.join(unknown)}")
    ceiling = _amount(where, "ceiling", entry.get("ceiling", 1.0), share_may_be_whole=True)
    reserve = _amount(where, "reserve", entry.get("reserve", 0))
    transactional = _amount(where, "transactional_reserve", entry.get("transactional_reserve", 0))
    if reserve[1] + transactional[1] >= 1 or (not ceiling[0] and transactional[1] >= ceiling[1]):
        raise ConfigError(f"{where}: reserve and transactional_reserve leave bulk calls nothing")
    return WorkspacePolicy(
        ceiling_calls=ceiling[0],
        ceiling_share=ceiling[1] if not ceiling[0] else 1.0,
        reserve_calls=reserve[0],
        reserve_share=reserve[1],
        transactional_calls=transactional[0],
        transactional_share=transactional[1],
    )


def _amount(where: str, name: str, value: Any, share_may_be_whole: bool = False) -> tuple[int, float]:
    """(calls, 0.0) for a whole number of calls, (0, share) for a share of the limit."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= (1 if share_may_be_whole else 0):
        return value, 0.0
    top = 1.0 if share_may_be_whole else 0.99
    if isinstance(value, float) and 0 < value <= top:
        return 0, value
    raise ConfigError(
        f"{where}: {name} must be a whole number of calls per window or a share of the limit "
        f"(a decimal in (0, {top}])"
    )
