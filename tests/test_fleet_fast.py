"""The fleet's rules (README "Fleet (Redis)") on an in-memory shared level: the shared document,
never downgrading a node (RFC 8461 §5.1), stale writes refused, one fetch per fleet, and a node
that works alone when the shared level is down. tests/test_fleet.py proves the same on real Redis."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from mtasts_policyd.core.policy import Mode, parse_policy
from mtasts_policyd.resolution.fleet import Fleet, Step
from mtasts_policyd.resolution.resolver import CacheState, Outcome
from mtasts_policyd.store.entry import Entry
from mtasts_policyd.store.shared import Horizons, IgnoredEntry, Notice, adopt, decode, encode, forget_message, read_notice
from tests.bodies import ENFORCE, ENFORCE_ONE_MX, NONE, TESTING
from tests.fakes import FakeShared

pytestmark = pytest.mark.fast

NOW = 1_800_000_000.0
KEY = b"k" * 32


def policy_entry(domain: str, body: str, fetched_at: float, pid: str = "1", **more: object) -> Entry:
    raw = body.format(d=domain).encode()
    return Entry(domain, txt_record=f"v=STSv1; id={pid}", policy_id=pid, policy_body=raw, policy=parse_policy(raw),
                 fetched_at=fetched_at, txt_expires_at=fetched_at + 300, **more)  # type: ignore[arg-type]


# ----- the shared document -----------------------------------------------------------------------


def test_document_round_trip_signed():
    entry = policy_entry("a.test", ENFORCE, NOW)
    back = decode(encode(entry, KEY), "a.test", NOW, KEY)
    assert (back.policy, back.policy_body, back.fetched_at, back.policy_id) == \
        (entry.policy, entry.policy_body, entry.fetched_at, entry.policy_id)


def test_unsigned_or_wrongly_signed_document_is_ignored():
    entry = policy_entry("a.test", ENFORCE, NOW)
    for raw in (encode(entry), encode(entry, b"x" * 32)):
        with pytest.raises(IgnoredEntry) as caught:
            decode(raw, "a.test", NOW, KEY)
        assert caught.value.reason == "signature"


def test_document_whose_claims_disagree_with_its_body_is_ignored():
    """The body is parsed again: a document that says enforce over a body that says none is not used."""
    document = json.loads(encode(policy_entry("a.test", NONE, NOW)))
    document["mode"] = "enforce"
    with pytest.raises(IgnoredEntry) as caught:
        decode(json.dumps(document), "a.test", NOW)
    assert caught.value.reason == "mismatch"


def test_altered_body_that_no_longer_parses_is_ignored():
    document = json.loads(encode(policy_entry("a.test", ENFORCE, NOW)))
    document["record"]["policy_body"] = "version: STSv1\nmode: sometimes\n"
    with pytest.raises(IgnoredEntry) as caught:
        decode(json.dumps(document), "a.test", NOW)
    assert caught.value.reason == "unreadable"


def test_document_under_another_domains_key_is_ignored():
    with pytest.raises(IgnoredEntry) as caught:
        decode(encode(policy_entry("a.test", ENFORCE, NOW)), "b.test", NOW)
    assert caught.value.reason == "mismatch"


def test_fetch_time_in_the_future_is_ignored():
    """A fetched_at in the future would stretch max_age (RFC 8461 §5.1)."""
    with pytest.raises(IgnoredEntry):
        decode(encode(policy_entry("a.test", ENFORCE, NOW + 3600)), "a.test", NOW)


# ----- adopt: add or refresh, never downgrade -------------------------------------------------------


def test_newer_enforce_fetch_is_taken_keeping_the_nodes_lookup_time():
    local = policy_entry("a.test", ENFORCE, NOW - 1000, last_lookup=NOW - 5, version=3)
    remote = policy_entry("a.test", ENFORCE, NOW - 10, pid="2")
    taken = adopt(local, remote, NOW)
    assert taken is not None and taken.policy_id == "2" and taken.version == 3 and taken.last_lookup == NOW - 5


@pytest.mark.parametrize("body", [NONE, TESTING])
def test_newer_weaker_mode_never_replaces_a_usable_enforce_policy(body):
    """RFC 8461 §5.1: a usable enforce policy stays until it expires; only the node's own refresh changes it."""
    local = policy_entry("a.test", ENFORCE, NOW - 1000)
    with pytest.raises(IgnoredEntry) as caught:
        adopt(local, policy_entry("a.test", body, NOW - 10, pid="2"), NOW)
    assert caught.value.reason == "downgrade"


def test_no_policy_never_replaces_a_usable_enforce_policy():
    local = policy_entry("a.test", ENFORCE, NOW - 1000)
    remote = Entry("a.test", negative_until=NOW + 600)
    assert adopt(local, remote, NOW) is None  # older than the node's fetch: tells it nothing


def test_weaker_mode_is_taken_once_the_enforce_policy_expired():
    local = policy_entry("a.test", ENFORCE, NOW - 90000)  # max_age 86400: expired
    taken = adopt(local, policy_entry("a.test", TESTING, NOW - 10, pid="2"), NOW)
    assert taken is not None and taken.policy is not None and taken.policy.mode is Mode.TESTING


def test_older_fetch_adds_nothing():
    assert adopt(policy_entry("a.test", ENFORCE, NOW - 10), policy_entry("a.test", ENFORCE, NOW - 1000), NOW) is None


def test_same_fetch_takes_the_later_txt_check_and_back_off():
    local = policy_entry("a.test", ENFORCE, NOW - 1000)
    remote = replace(local, txt_expires_at=NOW + 900, retry_after=NOW + 300, failures=1, failure_at=NOW - 1)
    taken = adopt(local, remote, NOW)
    assert taken is not None and taken.txt_expires_at == NOW + 900 and taken.retry_after == NOW + 300


def test_a_shared_entry_promises_no_further_than_the_nodes_own_bounds():
    """A shared copy (tampered with, or from a node configured otherwise) must not hold a node off
    the network longer than the node itself would: a back-off far ahead would keep it from ever
    refreshing an enforce policy, which would then expire into NOTFOUND (a downgrade, RFC 8461
    §5.1); a negative TTL far ahead would hide a policy the domain publishes. Each promise into
    the future is cut at the node's own bound (resolver settings)."""
    horizons = Horizons(negative=3600, txt=3600, backoff=3600)
    local = policy_entry("a.test", ENFORCE, NOW - 1000)
    year = 365 * 86400
    remote = replace(local, txt_expires_at=NOW + year, retry_after=NOW + year, failures=1, failure_at=NOW - 1,
                     mx_expires_at=NOW + year)
    taken = adopt(local, remote, NOW, horizons)
    assert taken is not None
    assert (taken.txt_expires_at, taken.retry_after, taken.mx_expires_at) == (NOW + 3600, NOW + 3600, NOW + 3600)
    fresh = adopt(None, Entry("b.test", negative_until=NOW + year), NOW, horizons)
    assert fresh is not None and fresh.negative_until == NOW + 3600


def test_same_fetch_time_with_another_body_is_a_conflict():
    local = policy_entry("a.test", ENFORCE, NOW - 1000)
    remote = policy_entry("a.test", ENFORCE.replace("mx1", "evil"), NOW - 1000)
    with pytest.raises(IgnoredEntry) as caught:
        adopt(local, remote, NOW)
    assert caught.value.reason == "conflict"


# ----- nodes on one shared level -----------------------------------------------------------------------


@pytest.fixture
def fleet_of(make_fake_resolver):
    def make(shared: FakeShared) -> Fleet:
        resolver = make_fake_resolver()
        fleet = Fleet(shared, resolver, lock_ttl=5.0, node=f"node{id(resolver)}")
        resolver.fleet = fleet
        return fleet
    return make


def test_second_node_answers_from_the_first_nodes_fetch(fake_net, fleet_of):
    shared = FakeShared(KEY)
    one, two = fleet_of(shared), fleet_of(shared)
    fake_net.publish("a.test")
    assert one.first("a.test") is Step.FETCH  # cold everywhere: this node takes the lock
    assert two.first("a.test") is Step.WAIT  # the other waits for it
    one.resolver.resolve("a.test")  # fetches, writes, lets go of the lock
    answer = two.first("a.test")
    assert not isinstance(answer, Step) and answer.state is CacheState.HIT and answer.policy is not None
    assert fake_net.https.count("a.test") == 1
    assert two.resolver.cache.get("a.test") is not None  # now in the second node's own cache


def test_shared_back_off_is_not_repeated_by_other_nodes(fake_net, fleet_of):
    shared = FakeShared()
    one, two = fleet_of(shared), fleet_of(shared)
    fake_net.publish("a.test", status=500)
    one.first("a.test")
    assert one.resolver.resolve("a.test").outcome is Outcome.FAILED
    answer = two.first("a.test")
    assert not isinstance(answer, Step) and answer.state is CacheState.BACKOFF
    assert fake_net.https.count("a.test") == 1


def test_stale_write_is_refused_and_the_newer_fetch_taken(fake_net, fleet_of, clock):
    shared = FakeShared()
    one = fleet_of(shared)
    newer = policy_entry("a.test", ENFORCE, clock.now + 10, pid="9")
    shared.put(newer, 0)
    one.publish(policy_entry("a.test", ENFORCE, clock.now))
    assert json.loads(shared.docs["a.test"])["record"]["policy_id"] == "9"
    assert one.counts["refused"] == 1


def test_tampered_none_never_downgrades_a_node(fake_net, fleet_of, clock):
    shared = FakeShared()
    node = fleet_of(shared)
    fake_net.publish("a.test")
    node.resolver.resolve("a.test")
    shared.docs["a.test"] = encode(policy_entry("a.test", NONE, clock.now + 1, pid="2"))
    node.invalidated("a.test", "elsewhere", Notice.WRITTEN)
    decision, _ = node.resolver.cached("a.test")
    assert decision is not None and decision.policy is not None and decision.policy.mode is Mode.ENFORCE
    assert node.ignored["downgrade"] == 1


def test_level_down_means_single_node_mode(fake_net, fleet_of):
    shared = FakeShared()
    shared.down = True
    node = fleet_of(shared)
    fake_net.publish("a.test")
    assert node.first("a.test") is Step.FETCH
    assert node.resolver.resolve("a.test").decision.policy is not None  # publish fails quietly


def test_read_only_node_never_writes(fake_net, fleet_of):
    shared = FakeShared(read_only=True)
    node = fleet_of(shared)
    fake_net.publish("a.test")
    assert node.first("a.test") is Step.FETCH  # nobody holds the lock: fetch, without taking it
    node.resolver.resolve("a.test")  # FakeShared.put asserts if asked
    assert shared.writes == 0 and not shared.locks


def test_waiter_fetches_itself_after_the_deadline(fake_net, fleet_of, clock):
    """A holder that died: the waiting node gives up waiting at its deadline and resolves."""
    shared = FakeShared()
    node = fleet_of(shared)
    shared.locks.add("a.test")

    async def run() -> object:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            loop = asyncio.get_running_loop()
            return await node.before_network("a.test", pool, loop.time() + 0.2)
    assert asyncio.run(run()) is None
    assert node.counts["lock_waits"] == 1


# ----- configuration ---------------------------------------------------------------------------------


def test_redis_config_defaults_and_serve_flag():
    from mtasts_policyd.commands.common import configure
    from mtasts_policyd.commands.main import make_parser
    from mtasts_policyd.runtime.config import Config
    assert Config().cache.redis is None  # a node alone by default
    config = configure(make_parser().parse_args(["serve", "--redis", "redis://fleet:pw@127.0.0.1:6380/2"]))
    redis = config.cache.redis
    assert redis is not None and redis.url == "redis://fleet:pw@127.0.0.1:6380/2"
    assert (redis.read_only, redis.prefix, redis.timeout, redis.hmac_key) == (False, "mtasts:v1:", 0.2, None)


@pytest.mark.parametrize("redis, error", [
    ({}, "cache.redis.url: must not be empty"),
    ({"url": "http://127.0.0.1:6379"}, "cache.redis.url: expected a URL"),
    ({"url": "redis://127.0.0.1:6379", "read_url": "127.0.0.1"}, "cache.redis.read_url: expected a URL"),
    ({"url": "redis://127.0.0.1:6379", "timeout": 0}, "cache.redis.timeout: must be at least"),
    ({"url": "redis://127.0.0.1:6379", "hmac_key": "short"}, "cache.redis.hmac_key: must be at least 16"),
    ({"url": "redis://127.0.0.1:6379", "hmac_key_file": "/nonexistent/key"}, "cannot read /nonexistent/key"),
    ({"url": "redis://127.0.0.1:6379", "prefix": ""}, "cache.redis.prefix: must not be empty"),
    ({"url": "redis://127.0.0.1:6379", "colour": "red"}, "cache.redis: unknown key(s) colour"),
])
def test_redis_config_is_checked(redis, error):
    from mtasts_policyd.runtime.config import Config, ConfigError, build, checked
    with pytest.raises(ConfigError) as caught:
        checked(build(Config, {"cache": {"redis": redis}}))
    assert error in str(caught.value)


def test_hmac_key_file(tmp_path):
    from mtasts_policyd.runtime.config import Config, build, checked
    path = tmp_path / "key"
    path.write_text("a-long-enough-fleet-key\n")
    config = checked(build(Config, {"cache": {"redis": {"url": "rediss://127.0.0.1", "hmac_key_file": str(path)}}}))
    assert config.cache.redis is not None and config.cache.redis.key() == b"a-long-enough-fleet-key"


# ----- when a shared copy expires, and when it is due ------------------------------------------------


def test_shared_copy_ends_with_what_still_serves():
    """RFC 8461 §5.1: a policy serves until fetched_at + max_age; a negative answer or a back-off until
    its end; the shared key expires then, never later."""
    assert policy_entry("a.test", ENFORCE, NOW).ends_at() == NOW + 86400
    assert Entry("a.test", negative_until=NOW + 60).ends_at() == NOW + 60
    assert Entry("a.test", retry_after=NOW + 300).ends_at() == NOW + 300


def test_due_at_is_when_due_turns_true():
    entry = policy_entry("a.test", ENFORCE_ONE_MX, NOW)  # TXT id trusted for 300 s
    assert entry.due_at(86400) == NOW + 300
    assert not entry.due(entry.due_at(86400) - 1, 86400) and entry.due(entry.due_at(86400), 86400)
    backing_off = replace(entry, retry_after=NOW + 900)
    assert backing_off.due_at(86400) == NOW + 900
    negative = Entry("a.test", negative_until=NOW + 60)
    assert negative.due_at(86400) == NOW + 60 and negative.due(NOW + 60, 86400)


def test_forget_notices_must_be_signed_and_fresh_with_an_hmac_key():
    """store/shared.read_notice: a forget drops enforce policies, so with hmac_key it must be the
    fleet's (signed) and recent; a write notice only makes a node read (and check) the entry."""
    message = forget_message("a.test", "n1", NOW, KEY)
    assert read_notice(message, NOW + 5, KEY) == ("a.test", "n1", Notice.FORGOTTEN)
    assert read_notice(message, NOW + 3600, KEY)[2] is Notice.FORGED  # replayed later
    assert read_notice(message.replace("a.test", "b.test", 1), NOW, KEY)[2] is Notice.FORGED
    assert read_notice(forget_message("a.test", "n1", NOW), NOW, KEY)[2] is Notice.FORGED  # unsigned
    assert read_notice(forget_message("a.test", "n1", NOW), NOW) == ("a.test", "n1", Notice.FORGOTTEN)  # no key
    assert read_notice("a.test n1", NOW, KEY) == ("a.test", "n1", Notice.WRITTEN)
