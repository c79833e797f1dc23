"""Membership: which islands may join, their leases (TTL) and fencing epochs.

An island registers with its id and token and gets a lease (a random id, a TTL and an epoch).
Every later call carries the lease; one whose epoch is not the island's current epoch is fenced
off, so a process that lost its lease and came back can never act with its old identity.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from archipelago.errors import UserError
from coordinator.store import StateStore

log = logging.getLogger(__name__)

MAX_ISLAND_ID_CHARS = 128


def same_secret(expected: str, given: str) -> bool:
    """Constant-time comparison that accepts any Unicode (compare_digest refuses non-ASCII str)."""
    return secrets.compare_digest(expected.encode(), given.encode())


class LeaseError(Exception):
    """A call with a lease that is unknown, fenced or expired; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Member:
    island_id: str
    lease_id: str
    epoch: int
    expires_at: float
    state: str = "live"  # live | expired | drained
    pushes: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    last_seen: float = field(default_factory=time.monotonic)


def load_tokens(path: str) -> dict[str, str] | None:
    """{island_id: token} from a JSON file; None (open registration) when no file is configured."""
    if not path:
        return None
    file = Path(path)
    try:
        table = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"coordinator.islands_file {file} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"coordinator.islands_file {file} is not valid JSON: {exc}") from exc
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise UserError(f"coordinator.islands_file {file} must map island ids to token strings")
    return table


class Membership:
    def __init__(self, store: StateStore, ttl_s: float, tokens: dict[str, str] | None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.tokens = tokens
        self.members: dict[str, Member] = {}
        if tokens is None:
            log.warning("open registration: any island id is accepted without a token "
                        "(set coordinator.islands_file for a real run)")

    def authenticate(self, island_id: str, token: str) -> None:
        if not island_id:
            raise LeaseError("INVALID_ARGUMENT", "island_id is empty")
        if len(island_id) > MAX_ISLAND_ID_CHARS:
            raise LeaseError("INVALID_ARGUMENT", f"island_id of {len(island_id)} characters is longer than "
                                                 f"{MAX_ISLAND_ID_CHARS}")
        if self.tokens is not None:
            if island_id not in self.tokens:
                raise LeaseError("NOT_FOUND", f"unknown island '{island_id}'")
            if not same_secret(self.tokens[island_id], token):
                raise LeaseError("UNAUTHENTICATED", f"wrong token for island '{island_id}'")

    def register(self, island_id: str, token: str) -> Member:
        self.authenticate(island_id, token)
        previous = self.members.get(island_id)
        if previous is not None and previous.state == "drained":
            raise LeaseError("PERMISSION_DENIED", f"island '{island_id}' was drained by an operator")
        epoch = self.store.next_epoch(island_id)
        member = Member(island_id, secrets.token_hex(16), epoch, time.monotonic() + self.ttl_s)
        if previous is not None:
            member.pushes, member.bytes_in, member.bytes_out = previous.pushes, previous.bytes_in, previous.bytes_out
        self.members[island_id] = member
        return member

    def check(self, island_id: str, lease_id: str, epoch: int) -> Member:
        """The member for a valid lease; refreshes nothing."""
        member = self.members.get(island_id)
        if member is None:
            if self.tokens is not None and island_id not in self.tokens:
                raise LeaseError("NOT_FOUND", f"unknown island '{island_id}'")
            raise LeaseError("FAILED_PRECONDITION", f"island '{island_id}' has no lease: register first")
        if epoch != member.epoch:
            raise LeaseError("FAILED_PRECONDITION", f"lease epoch {epoch} of island '{island_id}' is fenced "
                                                    f"(current epoch {member.epoch}): register again")
        if not same_secret(member.lease_id, lease_id):
            raise LeaseError("UNAUTHENTICATED", f"wrong lease id for island '{island_id}'")
        if member.state == "drained":
            raise LeaseError("PERMISSION_DENIED", f"island '{island_id}' was drained by an operator")
        if member.state == "expired" or member.expires_at < time.monotonic():
            member.state = "expired"
            raise LeaseError("FAILED_PRECONDITION", f"lease of island '{island_id}' expired: register again")
        return member

    def renew(self, member: Member) -> None:
        member.expires_at = time.monotonic() + self.ttl_s
        member.last_seen = time.monotonic()

    def expire_overdue(self) -> list[str]:
        now = time.monotonic()
        expired = []
        for member in self.members.values():
            if member.state == "live" and member.expires_at < now:
                member.state = "expired"
                expired.append(member.island_id)
        return expired

    def live(self) -> list[str]:
        now = time.monotonic()
        return [m.island_id for m in self.members.values() if m.state == "live" and m.expires_at >= now]

    def drain(self, island_id: str) -> None:
        if island_id not in self.members:
            raise LeaseError("NOT_FOUND", f"unknown island '{island_id}'")
        self.members[island_id].state = "drained"
