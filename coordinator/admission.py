"""Push admission: whether the coordinator takes a pseudo-gradient, and the named refusals.

`admit` is the one place that decides whether a push's claim (island, round, fragment, base
version, timeline) is acceptable now (docs/design.md, step 6). The servicer calls it on the
header, before a byte of the body is read, and the round engine calls it again under its lock
just before it makes the push durable: versions may have been committed, or the same push
received on another stream, while this one streamed. `check_push_fields` judges the header's
own numbers and `capped_tokens` how much of them a round counts; the body is judged as it is
received (coordinator/ingest.py: `check_body`). Nothing here changes state.

Every refusal is a `Refused` whose `code` is the gRPC status the island gets and whose `action`
(trailing metadata `archipelago-action`) says what the island can do about it by itself:
`register` (lease unknown, fenced or expired), `reload` (the coordinator rolled back: pull θ_b
again), `drop` (too stale to apply: drop it and go on) or `retry` (no room for it now: send it
again after a backoff).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.rounds import RoundEngine


class Refused(Exception):
    """A call the coordinator answers with gRPC status `code` and this message."""

    code = "INVALID_ARGUMENT"
    action = ""  # "" | "register" | "reload" | "drop" | "retry"

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


class Busy(Refused):
    """No room for this push now: the stream limits are reached, or the same push is being received
    on another stream (an island that gave up on a stream and sent it again)."""

    code, action = "RESOURCE_EXHAUSTED", "retry"


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


MAX_TOKENS = 1 << 53  # a push's tokens, always: weights are float64 and count tokens exactly below this
MAX_LOSS = 1e9  # |a reported loss|: far beyond any cross-entropy or policy loss a run reports
MAX_SECONDS = 1e10  # a reported compute time (over three centuries)


class BadPushHeader(Refused):
    """A header number out of what the run allows; the message names the field."""

    code = "INVALID_ARGUMENT"


def check_push_fields(header: Any, max_tokens_per_push: int = 0) -> None:
    """The numbers a push header reports, against what the run allows (docs/design.md step 6):
    tokens in [1, max_tokens_per_push] (0: up to 2**53); losses finite or NaN, NaN meaning "not
    measured"; compute seconds finite and non-negative. Each refusal names the field."""
    limit = max_tokens_per_push or MAX_TOKENS
    if header.tokens == 0:
        raise BadPseudoGradient("a push must report the tokens it trained on (tokens=0)")
    if header.tokens > limit:
        what = "coordinator.max_tokens_per_push" if max_tokens_per_push else "the hard bound 2**53"
        raise BadPushHeader(f"tokens={header.tokens} exceeds {what} ({limit}): no island's round trains on more")
    for field in ("loss_mean", "eval_loss"):
        value = getattr(header, field)
        if not (math.isnan(value) or abs(value) <= MAX_LOSS):
            raise BadPushHeader(f"{field}={value} is neither a loss (finite, |x| <= {MAX_LOSS:g}) nor NaN "
                                "(not measured)")
    if not 0 <= header.compute_s <= MAX_SECONDS:
        raise BadPushHeader(f"compute_s={header.compute_s} must be a number of seconds in [0, {MAX_SECONDS:g}]")


def capped_tokens(tokens: list[int], factor: float) -> list[int]:
    """Each push's tokens as the round counts them: at most ``factor`` × the round's lower median
    (the lower of the two middle values for an even count, so that with two islands the honest one
    sets the cap); ``factor`` 0: as reported. One island then gets at most factor / (factor + n − 1)
    of the weight of a round of n islands that report alike, whatever it claims."""
    if not factor or not tokens:
        return list(tokens)
    cap = factor * sorted(tokens)[(len(tokens) - 1) // 2]
    return [min(t, int(cap)) for t in tokens]
