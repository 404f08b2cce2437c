"""TLSRPT from a real Exim 4.96 log: real deliveries to MX hosts with each TLS defect.

What Exim logs is the fact; the parser follows it. Domains xrpt-<mode>-<behaviour>.e2e.test
publish an enforce or testing policy or none; their only MX is an SMTP sink with that TLS
behaviour (tests/rig/smtp_server.py). Each message is tried once (-odi); the deferred ones stay
queued and are not retried here. RECORD_EXIM_LOG=PATH saves the log (tests/data's recording).
"""

from __future__ import annotations

import datetime
import os
import shutil
import uuid
from collections import Counter

import pytest

from mtasts_policyd.ops.tlsrpt_exim import EximIngest
from mtasts_policyd.ops.tlsrpt_ingest import SourceAddresses, policy_from_cache
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.tlsrpt_store import TlsRptStore
from tests.e2e.exim_mta import EximInstance
from tests.e2e.test_tlsrpt_postfix_e2e import BEHAVIOURS, policy
from tests.e2e.world import Mx, Scenario, World, temp_dir
from tests.test_tlsrpt_exim import EXPECTED

MODES = tuple(EXPECTED)


@pytest.fixture(scope="module")
def exim_log(world: World, policyd):
    cases = {Scenario(f"xrpt-{mode}-{behaviour}", policy(mode), (Mx("mx", behaviour),), None): (mode, behaviour)
             for mode in MODES for behaviour in BEHAVIOURS}
    for scenario in cases:
        world.publish(scenario)
    exim = EximInstance(temp_dir("exim-tlsrpt-"), "127.0.0.1:8462")
    for scenario in cases:
        exim.send(f"u{uuid.uuid4().hex[:8]}@{scenario.domain}", uuid.uuid4().hex)
    log = exim.logs / "mainlog"
    if os.environ.get("RECORD_EXIM_LOG"):
        shutil.copyfile(log, os.environ["RECORD_EXIM_LOG"])
    return exim, cases


def test_each_session_is_counted_with_the_mapped_result(world: World, exim_log, tmp_path):
    # The mapping of tests/test_tlsrpt_exim.py (README "TLSRPT"), on this run's own log, with the
    # policy of each domain from the daemon's cache that Exim's lookups filled.
    exim, cases = exim_log
    cache = PolicyCache(str(world.directory / "policyd" / "cache.sqlite3"))
    try:
        with TlsRptStore(str(tmp_path / "tlsrpt.sqlite3")) as store:
            summary = EximIngest(store, policy_from_cache(cache), SourceAddresses()).ingest(str(exim.logs / "mainlog"))
            today = datetime.datetime.now(datetime.UTC).date()
            counts = [c for day in (today - datetime.timedelta(days=1), today) for c in store.sessions(day)]
    finally:
        cache.close()
    assert summary.unparsed == 0, exim.log()
    found: dict[str, Counter] = {}
    for count in counts:
        found.setdefault(count.policy.policy_domain, Counter())[count.result.value if count.result else None] += \
            count.sessions
    for scenario, (mode, behaviour) in cases.items():
        expected = EXPECTED[mode][behaviour]
        assert found.get(scenario.domain, Counter()) == (Counter() if expected == "-" else Counter({expected: 1})), \
            (scenario.domain, [line for line in exim.log().splitlines() if scenario.domain in line])
    policies = {count.policy.policy_domain: count.policy for count in counts}
    assert policies["xrpt-enforce-expired.e2e.test"].policy_string[1] == "mode: enforce"
    assert policies["xrpt-nopol-tls.e2e.test"].policy_type.value == "no-policy-found"


def test_contrib_log_selector_gives_the_fields_the_reader_needs(exim_log):
    # contrib/exim/exim.conf: +tls_certificate_verified (CV=) and +tls_peerdn (DN=) on deliveries.
    exim, _ = exim_log
    line = exim.status_of(next(l.split()[4] for l in exim.log().splitlines() if " => " in l and "xrpt-enforce-tls" in l))
    assert line is not None and " CV=yes " in line.line and " DN=" in line.line
