"""Push admission: whether the coordinator takes a pseudo-gradient, and the named refusals.

`admit` is the one place that decides whether a push's claim (island, round, fragment, base
version, timeline) is acceptable now (docs/design.md, step 6). The servicer calls it on the
header, before a byte of the body is read, and the round engine calls it again under its lock
just before it makes the push durable: versions may have been committed, or the same push
received on another stream, while this one streamed. `check_push_fields` judges the header's
own numbers; the body is judged as it is received (coordinator/ingest.py: `check_body`). Nothing
here changes state.

Every refusal is a `Refused` whose `code` is the gRPC status the island gets and whose `action`
(trailing metadata `archipelago-action`) says what the island can do about it by itself:
`register` (lease unknown, fenced or expired), `reload` (the coordinator rolled back: pull θ_b
again) or `drop` (too stale to apply: drop it and go on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.rounds import RoundEngine


class Refused(Exception):
    """A call the coordinator answers with gRPC status `code` and this message."""

    code = "INVALID_ARGUMENT"
    action = ""  # "" | "register" | "reload" | "drop"

    def __init__(self, message: str, code: str | None = None, action: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if action is not None:
            self.action = action


class AlreadyReceived(Refused):
    """This (island, round, fragment) was taken before: pending, applied or refused by the guard.
    The island counts it as done."""

    code = "ALREADY_EXISTS"


class OtherTimeline(Refused):
    """The push is based on a timeline a rollback abandoned."""

    code, action = "FAILED_PRECONDITION", "reload"


class StalePush(Refused):
    """The push's base version is older than the staleness limit allows."""

    code, action = "FAILED_PRECONDITION", "drop"


class RoundNotOpen(Refused):
    """The push is for a round of its fragment that has not opened yet."""

    code = "FAILED_PRECONDITION"


class NoSuchFragment(Refused):
    code = "INVALID_ARGUMENT"


class NotMyFragment(Refused):
    """The push is for a fragment another coordinator shard owns (docs/design.md, "Sharded
    coordinator"): the island was given the shards' addresses in another order, or too few."""

    code = "FAILED_PRECONDITION"


class AheadOfGlobal(Refused):
    """The push claims a base version the coordinator has not produced."""

    code = "INVALID_ARGUMENT"


class BadPseudoGradient(Refused):
    """A body that cannot be applied (non-finite, over the norm bound) or a push without weight."""

    code = "INVALID_ARGUMENT"


class NoSuchCheckpoint(Refused):
    """A rollback to a version that no kept checkpoint holds."""

    code = "NOT_FOUND"


@dataclass(frozen=True)
class PushClaim:
    """What a push says about itself: whose, for which round of which fragment, based on what."""

    island_id: str
    round: int
    fragment: int
    base_version: int
    timeline: int

    @property
    def key(self) -> tuple[str, int, int]:
        """The at-most-once key of the push."""
        return (self.island_id, self.round, self.fragment)


def admit(claim: PushClaim, engine: RoundEngine, staleness_limit: int) -> int:
    """The push's staleness (versions since its base) if the engine can take it now; else raises
    the `Refused` that says why."""
    cfg = engine.cfg
    if 0 <= claim.fragment < engine.num_fragments and cfg.owner(claim.fragment) != cfg.shard_index:
        raise NotMyFragment(f"fragment {claim.fragment} is not served by this coordinator: this is shard "
                            f"{cfg.shard_index} of {cfg.num_shards}, fragment {claim.fragment} belongs to "
                            f"shard {cfg.owner(claim.fragment)}")
    if claim.timeline != engine.timeline:
        raise OtherTimeline(f"push from island '{claim.island_id}' is based on timeline {claim.timeline}; the "
                            f"coordinator rolled back and is on timeline {engine.timeline}: reload θ_b")
    if not 0 <= claim.fragment < engine.num_fragments:
        raise NoSuchFragment(f"fragment {claim.fragment} does not exist (the run has {engine.num_fragments})")
    open_round = engine.rounds[claim.fragment]
    if claim.round > open_round:
        raise RoundNotOpen(f"round {claim.round} of fragment {claim.fragment} is not open (the open round is "
                           f"{open_round})")
    if engine.received(claim.key):
        raise AlreadyReceived(f"push for island '{claim.island_id}' round {claim.round} fragment {claim.fragment} "
                              "was already received")
    if claim.base_version > engine.version:
        raise AheadOfGlobal(f"base version {claim.base_version} is ahead of the global version {engine.version}")
    staleness = engine.version - claim.base_version
    if staleness > staleness_limit:
        raise StalePush(f"base version {claim.base_version} is {staleness} versions old; the staleness limit "
                        f"is {staleness_limit}")
    return staleness


def check_push_fields(tokens: int) -> None:
    """The header's numbers the outer step weighs a push by: it must report the tokens it trained on."""
    if tokens == 0:
        raise BadPseudoGradient("a push must report the tokens it trained on (tokens=0)")
