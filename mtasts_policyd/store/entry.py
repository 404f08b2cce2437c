"""What a cache entry is: what we know about one domain, and its rules over time.

One home for them: whether the cached policy may be applied (RFC 8461 §5.1), the entry's state
in the words of `cache list`, when a refetch (§10.2) or a refresh (TXT re-check, refetch, MX) is
due, and how two versions of an entry written by two processes merge. The resolver, the warmer,
the cache tools and every store ask these; none of them decides on its own. Pure: no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from mtasts_policyd.core.dane_verdict import DaneBranch
from mtasts_policyd.core.errors import Failure, FailureKind
from mtasts_policyd.core.policy import Policy

# RFC 8461 §10.2: "refresh at least once per day" (seconds); the resolver's default refresh_after.
DAILY = 86400.0


class EntryState(enum.Enum):
    """An entry's state at a time: the vocabulary of `cache list` and `cache show` (README)."""

    ENFORCE = "enforce"  # a usable policy in that mode (a later refresh may have failed)
    TESTING = "testing"
    NONE = "none"
    NO_POLICY = "no-policy"  # no (or an invalid) TXT record, cached for the DNS negative TTL
    FAILING = "failing"  # nothing usable, and the last attempt failed (back-off until retry_after)
    EXPIRED = "expired"  # max_age or the negative TTL has passed: the next lookup asks again


@dataclass(frozen=True)
class Entry:
    """What we know about one domain. Immutable: updates replace the whole entry."""

    domain: str
    txt_record: str | None = None  # the STSv1 TXT record the cached policy was fetched for
    policy_id: str | None = None
    policy_body: bytes | None = None
    policy: Policy | None = None  # parsed from policy_body; not stored
    fetched_at: float | None = None
    txt_expires_at: float = 0.0  # the TXT id is trusted until then (its DNS TTL, bounded)
    negative_until: float = 0.0  # "no policy" (no or invalid record) is known until then
    failure: Failure | None = None  # the last failure, kept for query/logs until a success
    failure_at: float | None = None
    failures: int = 0  # consecutive failures, for back-off
    retry_after: float = 0.0  # no network for this domain before then
    last_lookup: float = 0.0
    mx_hosts: tuple[str, ...] | None = None  # MX host names, looked up for policies with "*." patterns
    mx_expires_at: float = 0.0
    # The DANE branch beside the MTA-STS one (issue 9): the verdict for the domain, what it was
    # decided on, when; it holds for its decision's TTL (resolution/dane.py says when to ask again).
    dane: DaneBranch | None = None
    version: int = 0  # the stored row's version when read (0: not stored); writes check it

    @property
    def expires_at(self) -> float | None:
        """RFC 8461 §3.2/§5.1: a policy may be used until max_age after its fetch."""
        if self.policy is None or self.fetched_at is None:
            return None
        return self.fetched_at + self.policy.max_age

    def usable_policy(self, now: float, *, resolving: bool = False) -> Policy | None:
        """The policy if it may be applied at `now`: the one home of that rule.

        RFC 8461 §5.1: a policy is used until max_age after its fetch. `resolving`: the caller is
        the resolution running at `now`, which also applies a policy fetched at `now`, even with
        max_age 0 (§3.2 allows it: apply the policy, keep it for no time). Answers from the cache
        never pass it, so such a policy serves the lookups that shared its fetch and no other.
        """
        expires = self.expires_at
        if expires is None:
            return None
        return self.policy if now < expires or (resolving and self.fetched_at == now) else None

    def state(self, now: float) -> EntryState:
        """The entry at `now` in one word: the usable policy's mode, no-policy, failing or expired."""
        policy = self.usable_policy(now)
        if policy is not None:
            return EntryState(policy.mode.value)
        if now < self.negative_until:
            return EntryState.NO_POLICY
        # A missing or broken record is "no policy", not a failure, once its negative TTL is over.
        if self.failure is not None and (now < self.retry_after or self.failure.kind not in (
                FailureKind.NO_RECORD, FailureKind.INVALID_RECORD)):
            return EntryState.FAILING
        return EntryState.EXPIRED

    def refetch_at(self, refresh_after: float) -> float:
        """RFC 8461 §10.2: when the policy is to be fetched again, whether or not its id changed:
        `refresh_after` seconds after its fetch (daily by default), or half a short max_age; a
        domain without a policy at once (-inf)."""
        if self.fetched_at is None or self.policy is None:
            return float("-inf")
        return self.fetched_at + min(refresh_after, self.policy.max_age / 2)

    def refetch_due(self, now: float, refresh_after: float) -> bool:
        return now >= self.refetch_at(refresh_after)

    def refresh_at(self, refresh_after: float) -> float:
        """When a background refresh of the policy is due: the TXT id's TTL has passed (RFC 8461
        §5.1 checks the id), a refetch is due (§10.2), or the MX hosts of a policy with "*."
        patterns have to be looked up again."""
        at = min(self.txt_expires_at, self.refetch_at(refresh_after))
        if self.policy is not None and self.policy.has_wildcards:
            at = min(at, self.mx_expires_at)
        return at

    def refresh_due(self, now: float, refresh_after: float) -> bool:
        return now >= self.refresh_at(refresh_after)

    def due(self, now: float, refresh_after: float) -> bool:
        """Whether a resolution at `now` would ask the network: a usable policy whose refresh is
        due, or nothing usable and no negative answer in force; never during a back-off (RFC 8461
        §3.3 asks to wait after a failure)."""
        if now < self.retry_after:
            return False
        if self.usable_policy(now) is not None:
            return self.refresh_due(now, refresh_after)
        return now >= self.negative_until

    def due_at(self, refresh_after: float) -> float:
        """When due() turns true, as a time (the order of the fleet's warmer index, store/redis.py):
        the refresh of a policy (TXT TTL, §10.2 refetch, MX), or its expiry, or the end of the
        negative TTL; never before a back-off ends."""
        expires = self.expires_at
        start = self.negative_until if expires is None else min(self.refresh_at(refresh_after), expires)
        return max(start, self.retry_after)

    def ends_at(self) -> float:
        """When nothing in the entry serves any more: the policy's expiry (RFC 8461 §5.1), the
        negative TTL, the back-off, whichever is last (a shared copy expires then, never later)."""
        return max(self.expires_at or 0.0, self.negative_until, self.retry_after)


def supersedes(current: Entry, ours: Entry, *, ties_to_current: bool = False) -> bool:
    """Whether the stored entry wins over ours: its policy fetch is newer (or, with
    `ties_to_current`, as new). See merge()."""
    theirs, mine = current.fetched_at or 0.0, ours.fetched_at or 0.0
    return theirs > mine or (ties_to_current and theirs == mine)


def merge(current: Entry | None, ours: Entry, *, ties_to_current: bool = False) -> Entry:
    """Our result, rebased on what another writer stored since we read the entry: what to write.

    The newer policy fetch wins whole (a failure or a stale read must never replace a policy that
    another process fetched later, RFC 8461 §5.1); otherwise ours wins, as the later observation.
    A fetch at the same time goes to ours, unless `ties_to_current` (an import: importing the same
    export twice must change nothing). The later lookup time is kept either way, and so is the
    later DANE decision: the DANE branch is asked on its own schedule (its DNS TTL), so whichever
    writer decided it last knows best, whoever fetched the policy last.
    """
    if current is None:
        return replace(ours, version=0)
    last_lookup = max(current.last_lookup, ours.last_lookup)
    dane = later_dane(current.dane, ours.dane)
    if supersedes(current, ours, ties_to_current=ties_to_current):
        return replace(current, last_lookup=last_lookup, dane=dane)
    return replace(ours, version=current.version, last_lookup=last_lookup, dane=dane)


def later_dane(current: DaneBranch | None, ours: DaneBranch | None) -> DaneBranch | None:
    """The DANE branch decided last (ours on a tie: the later observation)."""
    if current is None or (ours is not None and ours.decided_at >= current.decided_at):
        return ours
    return current
