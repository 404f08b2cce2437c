"""The sequences a sender runs over the network seams, each in one place: "look up the record,
fetch the policy, parse it" (RFC 8461 §3.1 then §3.3 and §3.2) and "which hosts take this
domain's mail" (RFC 5321 §5.1, RFC 7505).

Resolution (the daemon's algorithm, with its cache) and the survey (no cache) both use them, and
DANE will ask for the mail hosts again: the rules are here, the bookkeeping stays with them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from mtasts_policyd.core import names
from mtasts_policyd.core.errors import FailureKind, MtaStsError, NoRecord
from mtasts_policyd.core.policy import Policy, parse_policy
from mtasts_policyd.net.base import Discovery, Fetcher, StsAnswer

T = TypeVar("T")

# Failures of the `_mta-sts` TXT step (RFC 8461 §3.1); every other kind comes from the fetch.
TXT_KINDS = frozenset({FailureKind.NO_RECORD, FailureKind.INVALID_RECORD, FailureKind.DNS_TEMPORARY})


MailHosts = tuple[list[str], int | None]  # the hosts that take a domain's mail, and how long that may be kept


@dataclass(frozen=True)
class Ahead:
    """DNS answers the daemon got on its event loop before it handed the rest of a resolution to
    a worker thread (`look_ahead`); each is the answer or its failure, None when not asked.

    Why: asked here, both questions are in flight at once and cost the loop a socket each, and the
    worker thread is left with the HTTPS fetch and the cache write: one hand-off per cold domain
    and no blocking DNS in a thread (bench/README.md, "Cold path").
    """

    ipv4: list[str] | MtaStsError | None = None  # the policy host's A lookup (RFC 8461 §3.3)
    mx: MailHosts | MtaStsError | None = None  # `mail_hosts`, for a policy with "*." patterns


@dataclass(frozen=True)
class PolicyLookup:
    """What `get_policy` found: the domain's valid `_mta-sts` record, and its policy or why not."""

    answer: StsAnswer  # the record and its TTL
    body: bytes | None = None  # the policy as fetched; None when not fetched or the fetch failed
    policy: Policy | None = None  # parsed from body
    error: MtaStsError | None = None  # the fetch or parse failure: fetch-error, certificate-invalid, invalid-policy

    @property
    def fetched(self) -> bool:
        """Whether the policy host was asked (successfully or not)."""
        return self.body is not None or self.error is not None


def get_policy(domain: str, discovery: Discovery, fetcher: Fetcher, txt: StsAnswer | MtaStsError | None = None,
               known_id: str | None = None, ipv4: list[str] | MtaStsError | None = None) -> PolicyLookup:
    """RFC 8461 §3.1, §3.3, §3.2: the TXT record, then (only for a valid one) the policy over HTTPS.

    A TXT failure (no record, an invalid one, DNS failure) is raised: there is nothing to fetch.
    A fetch or parse failure is returned in `error`, beside the record it was for.
    `txt`: the TXT answer (or its failure) when the caller already asked (the daemon asks on its
    event loop); None asks here. `known_id`: the id of a policy the caller holds and does not
    need again; a record with that id is not fetched (§3.3: the id changes when the policy does).
    `ipv4`: the policy host's A lookup when the caller already made it (`Ahead.ipv4`).
    """
    if txt is None:
        answer = discovery.sts_record(domain)
    elif isinstance(txt, MtaStsError):
        raise txt
    else:
        answer = txt
    if known_id is not None and answer.record.id == known_id:
        return PolicyLookup(answer)
    try:
        body = fetcher.fetch(domain, ipv4)
        return PolicyLookup(answer, body, parse_policy(body))
    except MtaStsError as exc:
        return PolicyLookup(answer, error=exc)


def mail_hosts(discovery: Discovery, domain: str) -> MailHosts:
    """The hosts that take `domain`'s mail, in preference order, and how long that answer may be
    kept (None: unknown). RFC 5321 §5.1: no MX record means the domain itself; RFC 7505: a null MX
    (".") means the domain takes no mail, so no host. DnsTemporaryFailure is raised."""
    try:
        exchanges, ttl = discovery.mx_hosts(domain)
    except NoRecord as exc:
        return _mail_hosts(domain, None, exc.ttl)
    return _mail_hosts(domain, exchanges, ttl)


async def mail_hosts_async(discovery: Discovery, domain: str) -> MailHosts:
    """mail_hosts on the running event loop."""
    try:
        exchanges, ttl = await discovery.mx_hosts_async(domain)
    except NoRecord as exc:
        return _mail_hosts(domain, None, exc.ttl)
    return _mail_hosts(domain, exchanges, ttl)


def _mail_hosts(domain: str, exchanges: list[str] | None, ttl: int | None) -> MailHosts:
    return list(names.mail_hosts(domain, exchanges)), ttl


async def look_ahead(discovery: Discovery, domain: str, ipv4: bool, mx: bool) -> Ahead:
    """Ask, at once on the running event loop, the policy host's A records (`ipv4`: the policy is
    going to be fetched) and the domain's mail hosts (`mx`: the policy may have "*." patterns).
    Failures are kept as answers: what they mean is decided where the answers are used."""
    async def answer(question: Awaitable[T]) -> T | MtaStsError:
        try:
            return await question
        except MtaStsError as exc:
            return exc

    asked: list[Awaitable[Any]] = []
    if ipv4:
        asked.append(answer(discovery.addresses_async(names.policy_host(domain), ("A",))))
    if mx:
        asked.append(answer(mail_hosts_async(discovery, domain)))
    answers = iter(await asyncio.gather(*asked))
    return Ahead(next(answers) if ipv4 else None, next(answers) if mx else None)
