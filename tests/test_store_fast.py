"""The rules of a cache entry, the memory store and the codecs, in memory: no sockets, no files.

Entry.state / refetch_due / refresh_due / due and merge are the one home of those rules (the
resolver, the warmer and `cache` ask them); the real-server and real-file tests beside these
check that every caller does.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest

from mtasts_policyd.core.errors import Failure, FailureKind
from mtasts_policyd.core.policy import parse_policy
from mtasts_policyd.store.base import StoreStats
from mtasts_policyd.store.cache import PolicyCache
from mtasts_policyd.store.codec import (
    EXPORT_FORMAT,
    ExportFormatError,
    document_records,
    entry_from_record,
    export_document,
    export_record,
    from_row,
    to_row,
)
from mtasts_policyd.store.entry import DAILY, Entry, EntryState, merge, supersedes
from mtasts_policyd.store.memory import MemoryStore

pytestmark = pytest.mark.fast

NOW = 1_800_000_000.0
DAY = 86400.0


def policy_entry(domain: str = "a.test", mode: str = "enforce", *, max_age: int = 7 * 86400,
                 fetched_at: float = NOW - 3600, wildcard: bool = False, policy_id: str = "p1", **fields) -> Entry:
    mx = f"*.mx.{domain}" if wildcard else f"mx1.{domain}"
    body = f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: {max_age}\n".encode()
    fields.setdefault("txt_expires_at", NOW + 3600)
    return Entry(domain, txt_record=f"v=STSv1; id={policy_id}", policy_id=policy_id, policy_body=body,
                 policy=parse_policy(body),
                 fetched_at=fetched_at, **fields)


# ----- Entry.state: the `cache list` vocabulary ------------------------------------------------


def test_states_are_the_cache_list_vocabulary():
    assert [s.value for s in EntryState] == ["enforce", "testing", "none", "no-policy", "failing", "expired"]


@pytest.mark.parametrize("mode", ["enforce", "testing", "none"])
def test_usable_policy_is_in_its_mode(mode):
    assert policy_entry(mode=mode).state(NOW) is EntryState(mode)


def test_failed_refresh_keeps_the_usable_policy_state():
    # RFC 8461 §5.1: a failed refresh does not remove a cached policy before it expires.
    entry = policy_entry(failure=Failure(FailureKind.FETCH_ERROR, "500"), failure_at=NOW - 60, retry_after=NOW + 240)
    assert entry.state(NOW) is EntryState.ENFORCE


def test_policy_past_max_age_is_expired():
    # RFC 8461 §3.2/§5.1: usable until max_age after its fetch, and not a second longer.
    entry = policy_entry(max_age=3600, fetched_at=NOW - 3600)
    assert entry.state(NOW - 1) is EntryState.ENFORCE
    assert entry.state(NOW) is EntryState.EXPIRED


def test_no_policy_within_the_negative_ttl_then_expired():
    entry = Entry("a.test", negative_until=NOW + 60, failure=Failure(FailureKind.NO_RECORD, "NXDOMAIN"),
                  failure_at=NOW - 60)
    assert entry.state(NOW) is EntryState.NO_POLICY
    assert entry.state(NOW + 60) is EntryState.EXPIRED  # a missing record is not a failure once its TTL is over


def test_failing_while_backing_off_and_for_real_failures_after():
    fetch = Entry("a.test", failure=Failure(FailureKind.FETCH_ERROR, "500"), failure_at=NOW, retry_after=NOW + 300)
    assert fetch.state(NOW) is EntryState.FAILING
    assert fetch.state(NOW + 600) is EntryState.FAILING  # nothing usable, and the last attempt failed
    record = Entry("a.test", failure=Failure(FailureKind.INVALID_RECORD, "v=STSv2"), failure_at=NOW,
                   retry_after=NOW + 300)
    assert record.state(NOW) is EntryState.FAILING
    assert record.state(NOW + 300) is EntryState.EXPIRED


# ----- refetch_due, refresh_due, due -----------------------------------------------------------


def test_refetch_due_daily_whatever_the_id():
    # RFC 8461 §10.2: refresh at least once per day, id unchanged or not.
    entry = policy_entry(fetched_at=NOW)
    assert not entry.refetch_due(NOW + DAY - 1, DAILY)
    assert entry.refetch_due(NOW + DAY, DAILY)
    assert entry.refetch_due(NOW + 600, 600)  # refresh_after is the resolver's setting


def test_refetch_due_within_half_of_a_short_max_age():
    entry = policy_entry(max_age=600, fetched_at=NOW)
    assert not entry.refetch_due(NOW + 299, DAILY)
    assert entry.refetch_due(NOW + 300, DAILY)


def test_refetch_due_without_a_policy():
    assert Entry("a.test").refetch_due(NOW, DAILY)
    assert Entry("a.test", negative_until=NOW + 60).refetch_due(NOW, DAILY)


def test_refresh_due_when_the_txt_id_is_to_be_checked_again():
    # RFC 8461 §5.1: the TXT id tells whether the cached policy is current; it is trusted for its TTL.
    entry = policy_entry(fetched_at=NOW, txt_expires_at=NOW + 300)
    assert not entry.refresh_due(NOW + 299, DAILY)
    assert entry.refresh_due(NOW + 300, DAILY)


def test_refresh_due_when_a_wildcard_policy_needs_its_mx_hosts_again():
    plain = policy_entry(fetched_at=NOW, mx_expires_at=NOW + 60)
    wildcard = policy_entry(fetched_at=NOW, wildcard=True, mx_hosts=("x.mx.a.test",), mx_expires_at=NOW + 60)
    assert not plain.refresh_due(NOW + 60, DAILY)
    assert not wildcard.refresh_due(NOW + 59, DAILY)
    assert wildcard.refresh_due(NOW + 60, DAILY)


def test_due_asks_the_network_only_when_a_resolution_would():
    fresh = policy_entry(fetched_at=NOW, txt_expires_at=NOW + 300)
    assert not fresh.due(NOW, DAILY)
    assert fresh.due(NOW + 300, DAILY)
    # RFC 8461 §3.3: wait after a failure, even when a refresh is otherwise due.
    backing_off = policy_entry(fetched_at=NOW - 2 * DAY, failure=Failure(FailureKind.FETCH_ERROR, "500"),
                               retry_after=NOW + 60)
    assert not backing_off.due(NOW, DAILY)
    assert backing_off.due(NOW + 60, DAILY)
    negative = Entry("a.test", negative_until=NOW + 60)
    assert not negative.due(NOW, DAILY)
    assert negative.due(NOW + 60, DAILY)


# ----- merge: one rule for the resolver's commit, the disk's repair and `cache import` ----------


def test_merge_onto_nothing_is_an_insert():
    ours = policy_entry(version=7)
    assert merge(None, ours) == replace(ours, version=0)


def test_newer_fetch_by_another_process_wins_whole():
    # RFC 8461 §5.1: a failure or a stale read must never replace a policy fetched later.
    theirs = policy_entry(fetched_at=NOW, last_lookup=NOW - 10, version=3)
    ours = Entry("a.test", failure=Failure(FailureKind.DNS_TEMPORARY, "timeout"), failure_at=NOW + 1,
                 last_lookup=NOW + 1, version=1)
    merged = merge(theirs, ours)
    assert merged.policy_id == "p1" and merged.failure is None and merged.version == 3
    assert merged.last_lookup == NOW + 1  # the later lookup time is kept either way
    assert supersedes(theirs, ours)


def test_ours_wins_as_the_later_observation_and_takes_the_stored_version():
    theirs = policy_entry(fetched_at=NOW - DAY, last_lookup=NOW, version=5)
    ours = policy_entry(fetched_at=NOW, last_lookup=NOW - 100, version=2)
    merged = merge(theirs, ours)
    assert merged.fetched_at == NOW and merged.version == 5 and merged.last_lookup == NOW


def test_ties_go_to_ours_unless_asked_to_keep_the_stored_entry():
    theirs = policy_entry(fetched_at=NOW, policy_id="theirs", version=4)
    ours = policy_entry(fetched_at=NOW, policy_id="ours", version=0)
    assert merge(theirs, ours).policy_id == "ours"
    assert not supersedes(theirs, ours)
    # `cache import`: importing the same export twice changes nothing.
    assert merge(theirs, ours, ties_to_current=True).policy_id == "theirs"
    assert supersedes(theirs, ours, ties_to_current=True)


# ----- the memory store ------------------------------------------------------------------------


def test_memory_store_puts_only_on_the_version_read():
    store = MemoryStore()
    first = store.put(Entry("a.test", negative_until=NOW))
    assert first is not None and first.version == 1
    assert store.put(Entry("a.test", negative_until=NOW + 1)) is None  # based on no read: another writer was first
    second = store.put(policy_entry(version=first.version))
    assert second is not None and second.version == 2 and store.get("a.test") == second
    assert store.put(first) is None  # a stale read
    assert store.reload("a.test") == second
    assert store.inserted == 1


def test_memory_store_entries_due_delete_and_stats():
    store = MemoryStore()
    for entry in (policy_entry("c.test", txt_expires_at=NOW - 1), Entry("b.test", negative_until=NOW + 60),
                  policy_entry("a.test")):
        assert store.put(entry) is not None
    assert [e.domain for e in store.entries()] == ["a.test", "b.test", "c.test"]
    assert [e.domain for e in store.due(NOW)] == ["c.test"]
    assert store.stats() == StoreStats(rows=3, persistent=False, path=None, unsaved=0)
    assert store.delete("b.test") and not store.delete("b.test")
    assert store.stats().rows == 2 and store.get("b.test") is None


def test_memory_store_never_moves_a_lookup_time_back():
    store = MemoryStore()
    stored = store.put(Entry("a.test", negative_until=NOW, last_lookup=NOW))
    store.touch({"a.test": NOW - 5, "unknown.test": NOW})
    assert store.get("a.test") == stored
    store.touch({"a.test": NOW + 5})
    touched = store.get("a.test")
    assert touched.last_lookup == NOW + 5 and touched.version == stored.version  # no version bump
    assert store.get("unknown.test") is None


def test_memory_store_with_a_bound_forgets_the_least_recently_used():
    store = MemoryStore(max_entries=2)
    for domain in ("a.test", "b.test"):
        store.put(Entry(domain, negative_until=NOW))
    store.get("a.test")
    store.put(Entry("c.test", negative_until=NOW))
    assert [e.domain for e in store.entries()] == ["a.test", "c.test"]


# ----- PolicyCache in front of a store ---------------------------------------------------------


def test_cache_without_a_path_is_memory_only():
    cache = PolicyCache(None, memory_entries=10)
    assert not cache.persistent and cache.path is None and cache.unsaved == 0
    stored = cache.put(policy_entry())
    assert stored is not None and cache.get("a.test") == stored
    assert cache.stats() == StoreStats(rows=1, persistent=False, path=None, unsaved=0)
    assert cache.memory_size == 1 and cache.inserted == 1
    cache.close()


def test_cache_detects_a_stale_write_and_merges_like_the_resolver():
    store = MemoryStore()
    cache = PolicyCache(store=store)
    read = cache.get("a.test") or Entry("a.test")
    store.put(policy_entry(fetched_at=NOW))  # another writer, behind the memory layer's back
    ours = Entry("a.test", failure=Failure(FailureKind.FETCH_ERROR, "500"), failure_at=NOW + 1,
                 version=read.version)
    assert cache.put(ours) is None
    stored = cache.put(merge(cache.reload("a.test"), ours))
    assert stored is not None and stored.policy_id == "p1" and cache.get("a.test") == stored
    cache.close()


def test_cache_lookup_times_reach_memory_and_store():
    store = MemoryStore()
    cache = PolicyCache(store=store)
    cache.put(Entry("a.test", negative_until=NOW))
    cache.touch({"a.test": NOW + 1})
    assert cache.get("a.test").last_lookup == NOW + 1 and store.get("a.test").last_lookup == NOW + 1
    assert cache.delete("a.test") and cache.get("a.test") is None and store.get("a.test") is None


def test_cache_takes_a_path_or_a_store():
    with pytest.raises(ValueError):
        PolicyCache("x.sqlite3", store=MemoryStore())


# ----- codecs ----------------------------------------------------------------------------------


def full_entry() -> Entry:
    return policy_entry(wildcard=True, mx_hosts=("a.mx.a.test", "b.mx.a.test"), mx_expires_at=NOW + 30,
                        negative_until=NOW - 5, failure=Failure(FailureKind.FETCH_ERROR, "HTTP 500"),
                        failure_at=NOW - 1, failures=2, retry_after=NOW + 600, last_lookup=NOW - 2, version=3)


def test_row_codec_round_trip():
    entry = full_entry()
    assert from_row(to_row(entry)) == entry
    assert from_row(to_row(Entry("b.test"))) == Entry("b.test")


def test_row_whose_body_no_longer_parses_has_no_policy(caplog):
    row = to_row(Entry("a.test", policy_id="p1", policy_body=b"version: STSv1\nmode: strict\n", fetched_at=NOW))
    entry = from_row(row)
    assert entry.policy is None and entry.policy_body is not None and entry.usable_policy(NOW) is None
    assert "cache domain=a.test stored policy no longer parses; ignored" in caplog.text


def test_export_record_round_trip_keeps_everything_but_the_version():
    entry = full_entry()
    assert entry_from_record(json.loads(json.dumps(export_record(entry))), NOW) == replace(entry, version=0)


def test_export_keeps_a_stored_body_exactly_and_import_says_why_it_is_refused():
    # A body stored before a stricter parser (or by hand) may not parse: the export keeps its bytes.
    body = b"version: STSv1\nmode: none\nmax_age: 86400\n# \xff\n"
    record = export_record(Entry("a.test", policy_id="p1", policy_body=body, fetched_at=NOW))
    assert record["policy_body_encoding"] == "base64" and base64.b64decode(record["policy_body"]) == body
    with pytest.raises(ValueError, match="policy_body is not a valid policy: policy is not UTF-8 text"):
        entry_from_record(record, NOW)


def test_export_document_is_read_back_and_bad_documents_say_why():
    document = export_document([full_entry()], NOW)
    assert document["format"] == EXPORT_FORMAT
    assert document_records(json.dumps(document), "x.json") == json.loads(json.dumps(document))["entries"]
    for text, why in [("{", "x.json is not JSON"), ('{"format": "other"}', "not an mtasts-policyd cache export"),
                      (json.dumps({**document, "version": 2}), "has export format version 2"),
                      (json.dumps({**document, "entries": {}}), '"entries" must be a list')]:
        with pytest.raises(ExportFormatError, match=why):
            document_records(text, "x.json")


def test_import_refuses_what_would_stretch_or_invent_a_policy():
    record = export_record(full_entry())
    # RFC 8461 §3.2: max_age counts from the fetch; a fetch in the future would stretch it.
    with pytest.raises(ValueError, match="fetched_at is in the future"):
        entry_from_record({**record, "fetched_at": NOW + 3600}, NOW)
    with pytest.raises(ValueError, match="is not the id of txt_record"):
        entry_from_record({**record, "policy_id": "other"}, NOW)
    with pytest.raises(ValueError, match="holds nothing to import"):
        entry_from_record({"domain": "a.test"}, NOW)
