"""Prometheus metrics: a small in-process registry and its text exposition (README "Metrics").

No client library: a lookup answered from the cache costs a few microseconds, and counting it must
not add to that noticeably. Counters are plain dicts keyed by label tuples, the latency histogram
is a fixed list of buckets found with `bisect`, and the text exposition format 0.0.4 is written
only when somebody scrapes (ops/status_http.py serves it).

Counters are handed in, never imported by what counts: the daemon gives each front end its
`FrontEndMetrics` (a `FrontEndCounters`, frontends/base.py) and the resolver the registry itself
(a `ResolutionCounters`, resolution/resolver.py).

Threads: `FrontEndMetrics.answered()` runs on the event loop thread only (the front ends), so its
dicts need no lock: nothing else writes them, and the scrape reads them on the same thread.
Resolutions run in worker threads: `fetched()`, `resolved()` and `refresh_failed()` take a lock,
which costs nothing next to a DNS query or an HTTPS fetch; the scrape copies those dicts under it.
"""

from __future__ import annotations

import math
import platform
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mtasts_policyd import __version__
from mtasts_policyd.core.dane_verdict import Verdict
from mtasts_policyd.core.errors import FailureKind
from mtasts_policyd.resolution.resolver import Outcome
from mtasts_policyd.resolution.service import DROP_REASONS
from mtasts_policyd.store.tlsrpt_store import Totals

if TYPE_CHECKING:
    from mtasts_policyd.resolution.resolver import Decision

# Seconds. A cached lookup takes a few microseconds; a miss, a DNS round trip up to a whole HTTPS fetch.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)
OVERRIDE_ACTIONS = ("ignore", "enforce")
REFRESH_OUTCOMES = tuple(outcome.value for outcome in Outcome)
DANE_VERDICTS = tuple(verdict.value for verdict in Verdict)
DANE_ANSWERS = tuple(v for v in DANE_VERDICTS if v != Verdict.NONE.value)  # the ones that replace MTA-STS
PROBE_RESULTS = ("validating", "not-validating")  # the trust probe came back with AD, or not

Sample = tuple[dict[str, str], float]
Family = tuple[str, str, str, Iterable[Sample]]  # name, type, help, samples


class FrontEndMetrics:
    """One front end's lookups: counters by (answer, cache state), overrides, a latency histogram,
    protocol errors. It is the front end's `FrontEndCounters` (frontends/base.py).

    Event loop thread only: no lock. `answered` is on the path of every cached socketmap lookup, so
    there it is one dict increment and reads no clock: an answer given at once (`elapsed` 0) takes
    microseconds and is observed as 0 s, in the lowest bucket; `buckets` holds only the timed ones.
    """

    __slots__ = ("name", "lookups", "overrides", "protocol_errors", "dane", "bounds", "buckets", "seconds")

    def __init__(self, name: str, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.name = name
        self.lookups: defaultdict[tuple[str, str], int] = defaultdict(int)  # (answer, cache) -> count
        self.overrides: defaultdict[str, int] = defaultdict(int)  # action -> count
        self.protocol_errors = 0  # broken frames, timeouts: no request, so not a lookup
        self.dane: dict[str, int] = dict.fromkeys(DANE_ANSWERS, 0)  # replies from a DANE verdict
        self.bounds = tuple(bounds)
        self.buckets = [0] * (len(self.bounds) + 1)  # timed lookups per bucket (not cumulative; last: +Inf)
        self.seconds = 0.0

    def answered(self, answer: str, decision: Decision | None, elapsed: float = 0.0) -> None:
        """One reply to a request: count it by answer and cache state, and observe its latency."""
        if decision is None:
            self.lookups[answer, "none"] += 1
        else:
            self.lookups[answer, decision.state._value_] += 1  # a plain attribute; Enum.value is a property
            if decision.override is not None:
                self.overrides[decision.override.action] += 1
        if elapsed:
            self.buckets[bisect_left(self.bounds, elapsed)] += 1  # bucket le=b holds values <= b
            self.seconds += elapsed

    def protocol_error(self) -> None:
        self.protocol_errors += 1

    def dane_answered(self, verdict: str) -> None:
        self.dane[verdict] = self.dane.get(verdict, 0) + 1

    def histogram(self) -> list[int]:
        """Lookups per bucket, untimed ones (0 s) in the first."""
        buckets = list(self.buckets)
        buckets[0] += sum(self.lookups.values()) - sum(buckets)
        return buckets


class Metrics:
    """The daemon's registry: one `FrontEndMetrics` per registered front end (their names are the
    `frontend` label), and the resolution counters (`ResolutionCounters`)."""

    def __init__(self, frontends: Iterable[str] = ()) -> None:
        self.started = time.time()
        self.frontends: dict[str, FrontEndMetrics] = {}  # event loop thread only
        for name in frontends:
            self.frontend(name)
        # Any thread, under _lock.
        self._lock = threading.Lock()
        fetch_failures = [k.value for k in (FailureKind.FETCH_ERROR, FailureKind.CERTIFICATE_INVALID,
                                            FailureKind.INVALID_POLICY)]
        self.fetches: dict[str, int] = dict.fromkeys(["ok", *fetch_failures], 0)
        self.refreshes: dict[str, int] = dict.fromkeys(REFRESH_OUTCOMES, 0)
        self.refresh_failures: dict[str, int] = dict.fromkeys([FailureKind.DNS_TEMPORARY.value, *fetch_failures], 0)
        self.dane_lookups: dict[str, int] = dict.fromkeys(DANE_VERDICTS, 0)
        self.dane_probes: dict[str, int] = dict.fromkeys(PROBE_RESULTS, 0)

    def frontend(self, name: str) -> FrontEndMetrics:
        """The counters of the front end called `name` (made at first use: its series start at 0)."""
        counters = self.frontends.get(name)
        if counters is None:
            counters = self.frontends[name] = FrontEndMetrics(name)
        return counters

    # --- resolutions (worker threads): ResolutionCounters ---

    def _count(self, table: dict[str, int], key: str) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + 1

    def fetched(self, result: str) -> None:
        """A policy fetch: "ok" or the failure kind (fetch-error, certificate-invalid, invalid-policy)."""
        self._count(self.fetches, result)

    def resolved(self, outcome: Outcome) -> None:
        """A network resolution and what it did (README: mtasts_refreshes_total)."""
        self._count(self.refreshes, outcome.value)

    def refresh_failed(self, kind: str) -> None:
        self._count(self.refresh_failures, kind)

    # --- DANE (event loop): resolution/dane.DaneCounters ---

    def dane_decided(self, verdict: str) -> None:
        """A DANE lookup and its verdict (README: mtasts_dane_lookups_total)."""
        self._count(self.dane_lookups, verdict)

    def dane_probed(self, validating: bool) -> None:
        self._count(self.dane_probes, PROBE_RESULTS[0] if validating else PROBE_RESULTS[1])

    # --- exposition ---

    def render(self, gauges: Iterable[Family] = (), dropped: dict[str, int] | None = None) -> str:
        """The text exposition format 0.0.4. `gauges`: families computed by the caller at the scrape;
        `dropped`: the service's resolutions not seen through, by reason."""
        with self._lock:
            fetches, refreshes, failures = dict(self.fetches), dict(self.refreshes), dict(self.refresh_failures)
            dane_lookups, dane_probes = dict(self.dane_lookups), dict(self.dane_probes)
        dropped = {**dict.fromkeys(DROP_REASONS, 0), **(dropped or {})}
        out: list[str] = []

        def family(name: str, kind: str, help: str, samples: Iterable[Sample]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels(labels)} {_number(value)}")

        fronts = self.frontends.values()
        lookups = sorted((f.name, a, c, n) for f in fronts for (a, c), n in f.lookups.items())
        family("mtasts_lookups_total", "counter", "Replies to lookups, by front end, answer and cache state.",
               (({"frontend": f, "answer": a, "cache": c}, n) for f, a, c, n in lookups))
        overrides = dict.fromkeys(OVERRIDE_ACTIONS, 0)
        for front in fronts:
            for action, n in front.overrides.items():
                overrides[action] = overrides.get(action, 0) + n
        family("mtasts_overrides_total", "counter", "Lookups answered by a configured override, by action.",
               (({"action": a}, n) for a, n in sorted(overrides.items())))
        family("mtasts_protocol_errors_total", "counter",
               "Connections closed for a protocol error (broken netstring, oversized or missing request line).",
               (({"frontend": f.name}, f.protocol_errors) for f in fronts))
        family("mtasts_resolutions_dropped_total", "counter",
               "Resolutions not seen through: busy (max_pending reached, not started), timeout (a lookup "
               "waited lookup_timeout), abandoned (every waiting client left), stopping (SIGTERM).",
               (({"reason": r}, n) for r, n in sorted(dropped.items())))
        family("mtasts_fetches_total", "counter", "HTTPS policy fetches, by result (ok or the failure kind).",
               (({"result": r}, n) for r, n in sorted(fetches.items())))
        family("mtasts_refreshes_total", "counter",
               "Network resolutions (misses and background refreshes), by outcome.",
               (({"outcome": o}, n) for o, n in sorted(refreshes.items())))
        family("mtasts_refresh_failures_total", "counter",
               "Resolutions that failed and started a back-off, by failure kind.",
               (({"kind": k}, n) for k, n in sorted(failures.items())))
        family("mtasts_dane_answers_total", "counter",
               "Replies that came from a DANE verdict (dane-only, dane, temp) instead of the MTA-STS answer.",
               (({"frontend": f.name, "verdict": v}, n) for f in fronts for v, n in sorted(f.dane.items())))
        family("mtasts_dane_lookups_total", "counter", "DANE lookups (MX, addresses, TLSA), by verdict.",
               (({"verdict": v}, n) for v, n in sorted(dane_lookups.items())))
        family("mtasts_dane_probes_total", "counter",
               "Trust probes of the DNS resolver, by result (validating: the answer came with AD).",
               (({"result": r}, n) for r, n in sorted(dane_probes.items())))
        out.append("# HELP mtasts_lookup_seconds Time from taking up a request to its reply, by front end.")
        out.append("# TYPE mtasts_lookup_seconds histogram")
        for front in fronts:
            cumulative = 0
            for bound, n in zip((*front.bounds, math.inf), front.histogram()):
                cumulative += n
                labels = _labels({"frontend": front.name, "le": _number(bound)})
                out.append(f"mtasts_lookup_seconds_bucket{labels} {cumulative}")
            out.append(f"mtasts_lookup_seconds_sum{_labels({'frontend': front.name})} {_number(front.seconds)}")
            out.append(f"mtasts_lookup_seconds_count{_labels({'frontend': front.name})} {cumulative}")
        for name, kind, help, samples in gauges:
            family(name, kind, help, samples)
        family("mtasts_process_start_time_seconds", "gauge", "Start time of the process since the epoch, in seconds.",
               [({}, self.started)])
        family("mtasts_build_info", "gauge", "Version of mtasts-policyd and of Python; always 1.",
               [({"version": __version__, "python": platform.python_version()}, 1)])
        return "\n".join(out) + "\n"


def fleet_families(status: dict[str, Any]) -> list[Family]:
    """The fleet's shared level (README "Fleet (Redis)") as metrics, from resolution/fleet.Fleet.status."""
    return [
        ("mtasts_redis_up", "gauge", "1 while Redis answers (read-only included), 0 while it is skipped "
         "(circuit open: the node works alone).", [({}, int(status["state"] != "down"))]),
        ("mtasts_redis_errors_total", "counter", "Redis calls that failed (each opens the circuit for a while).",
         [({}, status["errors"])]),
        ("mtasts_redis_lookups_total", "counter", "Shared entries asked for before the network, by result.",
         [({"result": "hit"}, status["hits"]), ({"result": "miss"}, status["misses"])]),
        ("mtasts_redis_adopted_total", "counter", "Shared entries taken into this node's cache.",
         [({}, status["adopted"])]),
        ("mtasts_redis_writes_total", "counter", "Resolution results written to Redis, by result (refused: a "
         "newer policy fetch was shared).", [({"result": "written"}, status["written"]),
                                              ({"result": "refused"}, status["refused"])]),
        ("mtasts_redis_ignored_total", "counter", "Shared entries not used, by reason (unreadable, mismatch, "
         "signature, downgrade, conflict).", [({"reason": r}, n) for r, n in sorted(status["ignored"].items())]),
        ("mtasts_redis_lock_waits_total", "counter", "Resolutions that waited for another node's fetch.",
         [({}, status["lock_waits"])]),
        ("mtasts_redis_invalidations_total", "counter", "Other nodes' writes heard on the invalidation channel.",
         [({}, status["invalidations"])]),
    ]


def tlsrpt_families(totals: Totals) -> list[Family]:
    """The TLSRPT counts store's totals as metrics (README "Metrics"): the daemon exports them when
    it has the store open, so what `tlsrpt ingest --follow` and `build` write is seen there too."""
    return [
        ("mtasts_tlsrpt_sessions_total", "counter",
         "TLS sessions counted for TLSRPT, all days: success or the RFC 8460 result type (the daemon's own "
         "sts-policy-* failures included).", [({"result": r}, n) for r, n in sorted(totals.sessions.items())]),
        ("mtasts_tlsrpt_unparsed_lines_total", "counter", "MTA log lines `tlsrpt ingest` did not understand, by source.",
         [({"source": s}, n) for s, n in sorted(totals.unparsed.items())]),
        ("mtasts_tlsrpt_local_events_total", "counter",
         "Our own failures seen in the MTA log (never reported), by kind.",
         [({"kind": k}, n) for k, n in sorted(totals.local.items())]),
        ("mtasts_tlsrpt_reports_built", "gauge", "Reports `tlsrpt build` wrote (distinct day and policy domain).",
         [({}, totals.reports_built)]),
        ("mtasts_tlsrpt_report_deliveries", "gauge",
         "Report deliveries of `tlsrpt send` (one per report and rua) by state: sent, pending (failed, "
         "retried later), given-up.",
         [({"state": st}, totals.deliveries.get(st, 0)) for st in ("sent", "pending", "given-up")]),
    ]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
