"""DANE beside MTA-STS (issue 9; RFC 8461 §2: DANE takes precedence): the `dane` settings, whether
DANE answers apply now (the configured mode and the resolver's trust probe), when a cached DANE
branch must be asked again, and the DANE lookup of one domain on the event loop.

Trust model: the daemon does not validate DNSSEC; it believes the AD bit of the resolver the
operator configured (net/dnssec.py). The probe asks that resolver a question whose answer must
come back with AD: while it does not, every "insecure" answer may only mean "not validated", so
DANE lookups would decide NONE for domains that have DANE. `auto` then answers MTA-STS alone and
says DANE is degraded; `require` answers TEMP for every domain whose DANE state is not already
known, so that nothing is delivered on an unchecked downgrade. `off` is MTA-STS alone.

The branch's lifetime (`DaneTtl`, from the `dane` keys) is the minimum TTL of the records that
decided it, clamped, so a domain that starts publishing TLSA is seen within its DNS TTL; a TEMP
verdict holds a few seconds only. A lookup is never held up by a branch that is merely due: it
is answered from it while the branch is asked again in the background (as the MTA-STS half is,
README "How a lookup is answered"), unless the branch is TEMP (never kept past its hold) or
older than STALE_LIMIT past its expiry.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from mtasts_policyd.core.dane_verdict import DaneBranch, DaneDecision, DaneTtl, Verdict, decide, temp_decision
from mtasts_policyd.core.limits import limits
from mtasts_policyd.net.dane_lookup import dane_inputs
from mtasts_policyd.net.dnssec import DnssecQuestions, ProbeResult, ProbeTarget, probe

log = logging.getLogger("mtasts_policyd.dane")

DANE_MODES = ("auto", "require", "off")
# How long past its expiry a branch (other than TEMP) still answers while it is asked again: the
# serve-stale bound of RFC 8767 §5 (1 to 3 days), for a daemon whose resolver is down for long.
STALE_LIMIT = 86400.0
PROBE_RETRY = 30.0  # seconds between probes while the resolver does not validate (at most probe_interval)
PROBE_NOTE = "dane.probe"  # the probe's last word, kept in the cache file (PolicyCache.note)


def probe_text(text: str) -> None:
    ProbeTarget.parse(text)


@dataclass(frozen=True)
class DaneSettings:
    """The `dane` configuration section (README "Configuration", "DANE")."""

    mode: str = field(default="auto", metadata=limits(choices=DANE_MODES))
    # "NAME TYPE" the configured resolver must answer with AD; the root zone is signed
    probe: str = field(default=". NS", metadata=limits(check=probe_text))
    probe_interval: float = field(default=300.0, metadata=limits(min=1, max=86400))  # seconds
    # a verdict is kept for the minimum TTL of its records, within these bounds (seconds)
    ttl_min: int = field(default=60, metadata=limits(min=1, max=86400))
    ttl_max: int = field(default=3600, metadata=limits(min=1, max=86400))
    temp_ttl: int = field(default=5, metadata=limits(min=0, max=60))  # a TEMP verdict, never longer

    @property
    def ttl(self) -> DaneTtl:
        return DaneTtl(min=self.ttl_min, max=self.ttl_max, temp=self.temp_ttl)


class Need(enum.Enum):
    """What a lookup needs of the network for the DANE half of a domain."""

    NO = "no"  # nothing: DANE does not apply now, or the cached branch is fresh
    DUE = "due"  # answer from the cached branch, ask again in the background
    WAIT = "wait"  # nothing usable cached: the lookup waits for the DANE lookup


class DaneCounters(Protocol):
    """What DANE counts, handed in (ops/metrics.py implements it for the daemon)."""

    def dane_decided(self, verdict: str) -> None:
        """One DANE lookup and its verdict (a Verdict value)."""

    def dane_probed(self, validating: bool) -> None:
        """One trust probe and whether it came back with AD."""


class Notes(Protocol):
    """Where the probe's last word is kept across restarts (store/cache.PolicyCache)."""

    def note(self, key: str) -> str | None: ...

    def set_note(self, key: str, value: str) -> None: ...


class _NoCounters:
    def dane_decided(self, verdict: str) -> None:
        pass

    def dane_probed(self, validating: bool) -> None:
        pass


def not_on_loopback(addresses: tuple[str, ...]) -> list[str]:
    """The resolver addresses that are not on this machine: the AD bit from them crosses a network
    that may forge it (RFC 6698 §4, RFC 7672 §1.3: the resolver must be trusted, the path to it too)."""
    far = []
    for address in addresses:
        try:
            if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
                far.append(address)
        except ValueError:
            far.append(address)
    return far


class DaneGate:
    """DANE for the resolution: the settings (replaced on reload), the probe's last word, the rules
    for a cached branch and the DANE lookup. Event loop thread only, except `need` and `applied`,
    which read plain attributes (the resolver calls them from `cached()`)."""

    def __init__(self, settings: DaneSettings, resolver: DnssecQuestions,
                 counters: DaneCounters | None = None, notes: Notes | None = None, identity: str = "") -> None:
        """`notes`: where the probe's word is kept across restarts; `identity`: the resolver it was
        asked of (addresses and port), so a word about another resolver is never taken over."""
        self.settings = settings
        self.resolver = resolver
        self.counters: DaneCounters = counters if counters is not None else _NoCounters()
        self.notes = notes
        self.identity = identity
        self.validating: bool | None = None  # None: not probed yet
        self.detail = "not probed yet"
        self.checked_at: float | None = None
        self.generation = 0  # bumped whenever answers may change (probe state, mode): decision memos
        self._wake: asyncio.Event | None = None

    # ----- state ---------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def active(self) -> bool:
        """DANE lookups are made and their verdicts answered."""
        return self.settings.mode != "off" and self.validating is True

    @property
    def degraded(self) -> bool:
        """DANE is wanted, but the resolver has not shown that it validates."""
        return self.settings.mode != "off" and self.validating is not True

    @property
    def state(self) -> str:
        """off, validating or degraded: for /health, `query` and the logs."""
        return "off" if self.settings.mode == "off" else "degraded" if self.degraded else "validating"

    def status(self) -> dict[str, Any]:
        """The DANE part of /health and `query`."""
        if self.settings.mode == "off":
            return {"mode": "off", "state": "off"}
        return {"mode": self.settings.mode, "state": self.state, "probe": self.settings.probe,
                "validating": bool(self.validating), "detail": self.detail,
                "checked_at": self.checked_at}

    def reload(self, settings: DaneSettings) -> None:
        """SIGHUP: new settings; a new mode changes answers, a new probe target is asked at once."""
        old, self.settings = self.settings, settings
        if settings.mode != old.mode:
            self.generation += 1
        if settings.probe != old.probe or (old.mode == "off" and settings.mode != "off"):
            self.wake()

    # ----- the rules for a cached branch ------------------------------------------------------

    def need(self, branch: DaneBranch | None, now: float) -> Need:
        """What a lookup at `now` needs of the network for the DANE half."""
        if not self.active:
            return Need.NO  # MTA-STS alone (off, auto degraded), or require degraded: nothing to ask
        if branch is None:
            return Need.WAIT
        if now < branch.expires_at:
            return Need.NO
        if branch.verdict is Verdict.TEMP or now >= branch.expires_at + STALE_LIMIT:
            return Need.WAIT  # TEMP is never answered past its hold (issue 9)
        return Need.DUE

    def applied(self, domain: str, branch: DaneBranch | None, now: float,
                missing: str = "no DANE lookup was made") -> DaneDecision | None:
        """The DANE decision the front ends apply before the MTA-STS answer (None: MTA-STS alone)."""
        mode = self.settings.mode
        if mode == "off":
            return None
        if self.active:
            if branch is None:  # a lookup that was not seen through: the DNSSEC state is unknown
                return temp_decision(domain, f"DANE state unknown: {missing}", self.settings.ttl)
            return branch.decision
        if mode == "auto":
            return None  # degraded: MTA-STS alone, as without DANE (README "DANE")
        # require, degraded: what was learnt while the resolver validated still holds; nothing else does.
        if branch is not None and branch.verdict is not Verdict.TEMP and now < branch.expires_at + STALE_LIMIT:
            return branch.decision
        return temp_decision(domain, f"DANE required but the resolver does not validate DNSSEC ({self.detail})",
                             self.settings.ttl)

    # ----- the network -------------------------------------------------------------------------

    async def lookup(self, domain: str, now: float) -> DaneBranch:
        """MX, then addresses and TLSA of every MX host, decided (core/dane_verdict.py)."""
        inputs = await dane_inputs(self.resolver, domain)
        decision = decide(inputs, self.settings.ttl)
        self.counters.dane_decided(decision.verdict.value)
        level = logging.WARNING if decision.verdict is Verdict.TEMP else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "dane domain=%s verdict=%s ttl=%ds reason=%s", domain, decision.verdict.value,
                    decision.ttl, decision.reason)
        return DaneBranch(decision, inputs, now)

    async def probe_now(self) -> ProbeResult:
        """Ask the probe once and take its word (kept in `notes`); one log line when the state changes."""
        result = await probe(self.resolver, ProbeTarget.parse(self.settings.probe))
        self.counters.dane_probed(result.validating)
        self._take(result.validating, result.detail, time.time())
        if self.notes is not None:
            note = json.dumps({"resolver": self.identity, "probe": self.settings.probe, "validating": self.validating,
                               "detail": self.detail, "checked_at": self.checked_at})
            await asyncio.get_running_loop().run_in_executor(None, self.notes.set_note, PROBE_NOTE, note)
        return result

    def restore(self, now: float) -> bool:
        """Take over the probe's last word from `notes` when it was asked of this resolver, with this
        question, less than `probe_interval` ago: a restart then needs no network at all (README "How a
        lookup is answered"); the next probe is due when it would have been without the restart."""
        if self.notes is None or self.settings.mode == "off":
            return False
        try:
            kept = json.loads(self.notes.note(PROBE_NOTE) or "null")
            same = kept["resolver"] == self.identity and kept["probe"] == self.settings.probe
            validating, detail, checked_at = bool(kept["validating"]), str(kept["detail"]), float(kept["checked_at"])
        except (ValueError, TypeError, KeyError):
            return False
        if not same or not 0 <= now - checked_at < self.settings.probe_interval:
            return False
        self._take(validating, f"{detail} (probed {now - checked_at:.0f}s before this start)", checked_at)
        return True

    def _take(self, validating: bool, detail: str, checked_at: float) -> None:
        before = self.validating
        self.validating, self.detail, self.checked_at = validating, detail, checked_at
        if before is validating:
            return
        self.generation += 1
        if validating:
            log.log(logging.INFO if before is None else logging.WARNING,
                    "dane mode=%s state=validating probe=%r detail=%s", self.mode, self.settings.probe, detail)
        else:
            answer = "MTA-STS alone" if self.mode == "auto" else "TEMP for domains whose DANE state is not known"
            log.warning("dane mode=%s state=degraded probe=%r detail=%s; answering %s until it validates",
                        self.mode, self.settings.probe, detail, answer)

    def next_probe(self) -> float:
        """When (time.time()) the probe is due: `probe_interval` after the last one, PROBE_RETRY while degraded."""
        if self.checked_at is None:
            return 0.0
        interval = self.settings.probe_interval
        return self.checked_at + (interval if self.validating else min(interval, PROBE_RETRY))

    def wake(self) -> None:
        """Probe now (after a reload), not at the end of the interval."""
        if self._wake is not None:
            self._wake.set()

    async def run_prober(self) -> None:
        """Probe every `probe_interval` (every PROBE_RETRY seconds while degraded, so a resolver that
        restarted is trusted again soon); nothing while the mode is off."""
        self._wake = asyncio.Event()
        while True:
            off = self.settings.mode == "off"  # nothing to probe until a reload turns DANE on (wake)
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       timeout=None if off else max(self.next_probe() - time.time(), 0.0))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self.settings.mode == "off":
                continue
            try:
                await self.probe_now()
            except Exception as exc:  # the prober must outlive any surprise, and not spin on one
                log.error("dane probe failed: %r", exc)
                await asyncio.sleep(PROBE_RETRY)
