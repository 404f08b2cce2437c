"""The sequences a sender runs over the network seams, each in one place: "look up the record,
fetch the policy, parse it" (RFC 8461 §3.1 then §3.3 and §3.2) and "which hosts take this
domain's mail" (RFC 5321 §5.1, RFC 7505).

Resolution (the daemon's algorithm, with its cache) and the survey (no cache) both use them, and
DANE will ask for the mail hosts again: the rules are here, the bookkeeping stays with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtasts_policyd.core import names
from mtasts_policyd.core.errors import FailureKind, MtaStsError, NoRecord
from mtasts_policyd.core.policy import Policy, parse_policy
from mtasts_policyd.net.base import Discovery, Fetcher, StsAnswer

# Failures of the `_mta-sts` TXT step (RFC 8461 §3.1); every other kind comes from the fetch.
TXT_KINDS = frozenset({FailureKind.NO_RECORD, FailureKind.INVALID_RECORD, FailureKind.DNS_TEMPORARY})


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
               known_id: str | None = None) -> PolicyLookup:
    """RFC 8461 §3.1, §3.3, §3.2: the TXT record, then (only for a valid one) the policy over HTTPS.

    A TXT failure (no record, an invalid one, DNS failure) is raised: there is nothing to fetch.
    A fetch or parse failure is returned in `error`, beside the record it was for.
    `txt`: the TXT answer (or its failure) when the caller already asked (the daemon asks on its
    event loop); None asks here. `known_id`: the id of a policy the caller holds and does not
    need again; a record with that id is not fetched (§3.3: the id changes when the policy does).
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
        body = fetcher.fetch(domain)
        return PolicyLookup(answer, body, parse_policy(body))
    except MtaStsError as exc:
        return PolicyLookup(answer, error=exc)


def mail_hosts(discovery: Discovery, domain: str) -> tuple[list[str], int | None]:
    """The hosts that take `domain`'s mail, in preference order, and how long that answer may be
    kept (None: unknown). RFC 5321 §5.1: no MX record means the domain itself; RFC 7505: a null MX
    (".") means the domain takes no mail, so no host. DnsTemporaryFailure is raised."""
    try:
        exchanges, ttl = discovery.mx_hosts(domain)
    except NoRecord as exc:
        return list(names.mail_hosts(domain, None)), exc.ttl
    return list(names.mail_hosts(domain, exchanges)), ttl
