"""Braze's rate budget for one (workspace, pool), and the ports of the stores that keep it.

A `RateBudget` is what is known of one of a Braze workspace's pools (recipient calls, broadcast
calls, and each unique audience's broadcast calls: Braze keeps them apart): a pause until its
reset, the current window, the calls under way and the calls the gateway started in the window.
It never lets more calls start than the window has left (docs/braze/CONTRACT.md, section 8,
point 30). A window no reply has told of yet opens at the last x-ratelimit-limit, and a budget
never answered lets one call ask first, so that a fleet able to start more calls at once than a
window allows does not overspend it when a window opens.

Where the budgets live is a `BudgetStore`: this process's memory, a file a host's workers map,
or Redis for every replica (`stores/`). `limits.LocalLimiter` asks it before each call.

A `Headroom` is what the gateway leaves to others on a pool (docs/budgets.md): with L the last
x-ratelimit-limit, R the lowest x-ratelimit-remaining of the window (what everyone left), O the
calls the gateway started in the window and U those under way, a call may start while

    U < min(R - keep - lane, cap - lane - O + U)

where keep = keep_calls + ceil(keep_share * L) (the reserve left to other services), lane =
lane_calls + ceil(lane_share * L) (the transactional reserve, for a bulk call; 0 for a
transactional one) and cap = ceiling_calls, or floor(ceiling_share * L) (the most the gateway may
spend in a window; none when neither is set). Since R counts what others spend, the gateway backs
off when they spend. It applies once a window is known (a reply told of it, or it opened at the
last limit); when the free room is 0 with nothing under way the pool is spent until its reset.

Fair share between the tenants of a workspace within a lane (`Headroom.party`, a digest of the
tenant and its lane): while another party of the same lane has been held in the last
FAIR_SECONDS (the lane is contended), a party may have at most max(1, ceil(room / n)) calls under
way, where room is the bound on U above and n the parties of the lane active (a call under way,
or held in the last FAIR_SECONDS), itself included. Uncontended, one tenant may take the whole
room. A held party is recorded as waiting; a record tracks at most MAX_PARTIES parties at once
(those with nothing under way and no recent wait are dropped first); in memory and the host's
file a party beyond them is outside the fair share (its calls still count in U); Redis tracks all.

Over the ~300 lines the house aims for, for a reason: `RateBudget` (the fair share included) is
the one Python statement of the rules that `stores/redis_scripts.py`'s Lua and the mapped file
mirror, held to the same tests; it and the ports its stores implement read as one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Protocol, TypeVar

from .errors import StoreUnavailable
from .reply import Delivery, Reply

T = TypeVar("T")

MAX_PAUSE_SECONDS = 3600.0
"""The longest a tenant is paused on one reply: Braze's longest window is a clock hour."""


RECHECK_SECONDS = 0.02
"""While the calls under way would spend what a budget has left, how soon a call asks again."""


FAIR_SECONDS = 2.0
"""How long a held party counts as waiting (the lane contended) and as active."""

MAX_PARTIES: Final = 8
"""Parties (tenant, lane) a budget record tracks at once for the fair share (memory, host file)."""


BudgetKey = tuple[str, str]
"""(workspace, pool): the pool is `recipients`, `broadcast` or `audience:<digest>`."""

RECIPIENTS: Final = "recipients"
BROADCAST: Final = "broadcast"
AUDIENCE: Final = "audience"


def audience_pool(digest: str) -> str:
    """The pool of one unique audience's broadcast calls (Braze: 10 a minute each)."""
    return f"{AUDIENCE}:{digest}"


def pool_kind(pool: str) -> str:
    """A bounded name for a pool, for metrics: every audience's pool is `audience`."""
    return pool.partition(":")[0]


@dataclass(frozen=True, slots=True)
class Headroom:
    """What the gateway leaves of a pool (the formula is in this module's docstring). The default
    leaves nothing: every call Braze's own remaining allows may start."""

    keep_calls: int = 0
    keep_share: float = 0.0
    ceiling_calls: int = 0
    ceiling_share: float = 1.0
    lane_calls: int = 0
    lane_share: float = 0.0
    party: int = 0
    """`party_of(tenant, lane)`, whose fair share the call is held to; 0: none."""

    @property
    def active(self) -> bool:
        return (self.keep_calls, self.keep_share, self.ceiling_calls, self.ceiling_share) != (
            0,
            0.0,
            0,
            1.0,
        ) or (self.lane_calls, self.lane_share) != (0, 0.0)

    def room(self, left: int, limit: int, ours: int, under_way: int) -> int:
        """How many calls may be under way (`left`: R, `limit`: L, `ours`: O, `under_way`: U)."""
        lane = self.lane_calls + math.ceil(self.lane_share * limit)
        room = left - self.keep_calls - math.ceil(self.keep_share * limit) - lane
        cap = self.ceiling_calls or (
            math.floor(self.ceiling_share * limit) if self.ceiling_share < 1 and limit > 0 else None
        )
        if cap is not None:
            room = min(room, cap - lane - ours + under_way)
        return room

    def args(self) -> list[str]:
        """As the Lua script `stores/redis_scripts.RESERVE` reads it (ARGV[6] to ARGV[13])."""
        numbers = (self.keep_calls, self.keep_share, self.ceiling_calls, self.ceiling_share)
        lane = (self.lane_calls, self.lane_share)
        return ["1" if self.active else "0", *map(repr, numbers), *map(repr, lane), str(self.party)]


NO_HEADROOM: Final = Headroom()

TRANSACTIONAL: Final = "transactional"
BULK: Final = "bulk"
LANES: Final = (TRANSACTIONAL, BULK)
"""Priority lanes within a workspace: bulk calls leave the transactional reserve untouched."""


def party_of(tenant: str, lane: str) -> int:
    """A tenant in a lane, for the fair share: a 48-bit digest of the tenant (exact in Lua's
    numbers), times two, plus 1 for bulk; never 0."""
    digest = int.from_bytes(hashlib.blake2b(tenant.encode(), digest_size=6).digest(), "little")
    return (digest or 1) * 2 + (1 if lane == BULK else 0)


@dataclass(slots=True)
class Party:
    """One tenant's calls in one lane of a pool: how many are under way, when it last waited."""

    party: int
    under_way: int = 0
    waited: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkspacePolicy:
    """A workspace's headroom, from its `[workspaces.<name>]` table in the tenants file: each
    amount is a number of calls per window, or a share of x-ratelimit-limit. The default leaves
    nothing aside, as before workspaces had a policy."""

    ceiling_calls: int = 0
    ceiling_share: float = 1.0
    reserve_calls: int = 0
    reserve_share: float = 0.0
    transactional_calls: int = 0
    transactional_share: float = 0.0

    def headroom(self, lane: str) -> Headroom:
        """What a call of `lane` must leave: bulk calls also leave the transactional reserve."""
        bulk = lane == BULK
        return Headroom(
            keep_calls=self.reserve_calls,
            keep_share=self.reserve_share,
            ceiling_calls=self.ceiling_calls,
            ceiling_share=self.ceiling_share,
            lane_calls=self.transactional_calls if bulk else 0,
            lane_share=self.transactional_share if bulk else 0.0,
        )


DEFAULT_POLICY: Final = WorkspacePolicy()


class Hold(NamedTuple):
    """A call may not start yet: ask again at `until` (epoch seconds)."""

    until: float
    spent: bool
    """The budget is spent until `until`, its reset; else the calls under way would spend
    what it has left, and `until` is when to ask again."""


@dataclass(frozen=True, slots=True)
class Ticket:
    """A reserved call: counted as under way until it is settled."""

    key: BudgetKey
    """(workspace, pool)"""
    token: str = ""
    """A shared store's name for the reservation (it lapses by itself if never settled)."""
    shared: bool = False
    """Reserved in the shared store, not in the fallback of a `FailoverBudgets`."""
    ours: int = 0
    """The calls the gateway had started in the pool's window, this one included (metrics)."""
    party: int = 0
    """The party (tenant, lane) it counts for in the fair share; 0: none."""


@dataclass(slots=True)
class RateBudget:
    """What is known of one (workspace, pool): a pause, the current window, the calls under way.

    A window Braze has not yet answered in opens at the last limit Braze gave (x-ratelimit-limit),
    with the calls under way counted against it: a fleet that can start more calls at once than a
    window allows starts no more than the limit when the window turns. A budget never answered
    lets one call ask first, so that even the first window is not overspent."""

    paused_until: float = 0.0
    reset: int = 0
    """x-ratelimit-reset of the current window; 0: unknown"""
    left: int = 0
    """the lowest x-ratelimit-remaining seen with that reset; while the reset is unknown, the
    last known limit (0: none)"""
    under_way: int = 0
    limit: int = 0
    """the last x-ratelimit-limit Braze gave; 0: never answered with one; -1: a success carried none"""
    ours: int = 0
    """calls the gateway started in the current window (the calls under way when it turned count)"""
    parties: list[Party] = field(default_factory=list)
    """the fair share's parties, at most MAX_PARTIES"""

    def reserve(self, now: float, headroom: Headroom = NO_HEADROOM) -> Hold | None:
        """None when a call may start (it is counted as under way), else when to ask again.
        The Lua script in `stores/redis_scripts.py` is this method for Redis; they change together."""
        if self.paused_until > now:
            return Hold(self.paused_until, True)
        if self.reset and self.reset <= now:  # a new window: it opens at the last known limit
            self.reset, self.left, self.ours = 0, max(self.limit, 0), self.under_way
        # Known when a reply told of this window, or the window opened at the last limit. A budget
        # never answered lets one call ask first; one whose replies carry no limit is not bounded.
        known = bool(self.reset or self.left)
        room = self.left if known else 1 if self.limit == 0 else None
        if known and headroom.active:
            room = headroom.room(self.left, max(self.limit, 0), self.ours, self.under_way)
            if self.under_way == 0 and room <= 0 and self.reset:  # only a new window brings more
                return Hold(float(self.reset), True)
        party = self._party(headroom.party, now) if headroom.party else None
        if room is not None and (self.under_way >= room or self._over_share(party, room, now)):
            if party is not None:
                party.waited = now
            return Hold(min(float(self.reset or math.inf), now + RECHECK_SECONDS), False)
        self.under_way += 1
        self.ours += 1
        if party is not None:
            party.under_way += 1
        return None

    def _party(self, tag: int, now: float) -> Party | None:
        """The party's record, made if there is room; the parties gone quiet are dropped."""
        recent = now - FAIR_SECONDS
        self.parties = [p for p in self.parties if p.under_way > 0 or p.waited > recent]
        found = next((p for p in self.parties if p.party == tag), None)
        if found is None and len(self.parties) < MAX_PARTIES:
            found = Party(tag)
            self.parties.append(found)
        return found

    def _over_share(self, party: Party | None, room: int, now: float) -> bool:
        """Whether the party has its fair share under way while its lane is contended."""
        if party is None:
            return False
        recent = now - FAIR_SECONDS
        lane = party.party % 2
        others = [p for p in self.parties if p is not party and p.party % 2 == lane]
        if not any(p.waited > recent for p in others):
            return False
        return party.under_way >= max(1, math.ceil(room / (len(others) + 1)))

    def settle(self, reply: Reply | None, now: float, party: int = 0) -> float:
        """Release a call of `party`, learning from its reply (None: no call was made, so it is not
        one of the gateway's calls in the window either); the pause's end, or 0."""
        self.under_way = max(0, self.under_way - 1)
        for found in self.parties:
            if found.party == party:
                found.under_way = max(0, found.under_way - 1)
        if reply is None:
            self.ours = max(0, self.ours - 1)
        if reply is not None and reply.delivery is Delivery.RESPONDED:
            self.observe(reply, now)
        return self.paused_until if self.paused_until > now else 0.0

    def observe(self, reply: Reply, now: float) -> None:
        rate = reply.rate
        if rate.limit is not None and rate.limit > 0:
            self.limit = rate.limit
        elif self.limit == 0 and 200 <= reply.status < 300:
            # Only Braze's own answer tells that its replies carry no limit: a 5xx from an edge
            # (or a fault) has no headers and says nothing of the budget, so one call still asks.
            self.limit = -1
        if rate.remaining is not None and rate.reset is not None and rate.reset > now:
            if rate.reset > self.reset:  # a later window: start counting it
                if self.reset:  # it turned before any call asked: what is under way is in it
                    self.ours = self.under_way
                self.reset, self.left = rate.reset, rate.remaining
            elif rate.reset == self.reset:  # within a window it only shrinks
                self.left = min(self.left, rate.remaining)
        spent = reply.status == 429 or rate.remaining == 0
        if spent and rate.reset is not None and rate.reset > now:
            # Braze's windows are a clock hour at most: a later reset is a bad header, not a plan.
            # A pause is never lifted early: within a window the budget only shrinks, so a reply
            # showing budget left was sent before the one that spent it. It ends at its reset.
            self.paused_until = max(self.paused_until, min(float(rate.reset), now + MAX_PAUSE_SECONDS))


class BudgetStore(Protocol):
    """Where the `RateBudget`s live: this process, a host's workers, or Redis (`stores/`)."""

    async def reserve(
        self, key: BudgetKey, now: float, headroom: Headroom = NO_HEADROOM
    ) -> Ticket | Hold: ...

    async def settle(self, ticket: Ticket, reply: Reply | None, now: float) -> float: ...


class BudgetTable(Protocol):
    """Budgets kept in memory this process can lock: a dict, or a file the workers map."""

    def update(self, key: BudgetKey, change: Callable[[RateBudget], T]) -> T:
        """Apply `change` to the key's RateBudget as one step no other process interleaves with,
        keep the RateBudget it leaves, and return what `change` returned."""
        ...


class ReserveLost(StoreUnavailable):
    """A reserve whose answer never came: Redis may have made it (the script ran, or runs later),
    and then counts `ticket` as under way until its lease ends unless it is settled."""

    def __init__(self, message: str, ticket: Ticket) -> None:
        super().__init__(message)
        self.ticket = ticket
