"""The DANE decision table of issue 9 (answers/dane.py) and TLSA usability (core/dane.py), row by
row, on plain values: no sockets, no processes."""

from __future__ import annotations

import pytest

from mtasts_policyd.answers.dane import DaneDecision, DaneTtl, Verdict, decide, exim_reply, socketmap_answer
from mtasts_policyd.core.dane import (AddressState, DaneInputs, HostState, LookupFailure, MxKind, MxState, Tlsa,
                                      TlsaState, TlsaStatus, tlsa_name)

pytestmark = pytest.mark.fast

DOMAIN = "example.test"
USABLE = Tlsa(3, 1, 1, b"\x01" * 32)
UNUSABLE = Tlsa(1, 1, 1, b"\x01" * 32)  # PKIX-EE: RFC 7672 §3.1.3


def failure(name: str, rdtype: str) -> LookupFailure:
    return LookupFailure(name, rdtype, f"{name} {rdtype}: 127.0.0.1@53 answered SERVFAIL")


def host(name: str, address: str = "secure", tlsa: str | None = "usable", ttl: int = 300,
         tlsa_ttl: int = 300) -> HostState:
    """One MX host. address: secure, insecure, none (no address, authenticated), failed.
    tlsa: usable, unusable, mixed, none (authenticated denial), insecure, failed, or None (not asked)."""
    addresses = () if address == "none" else ("192.0.2.1",)
    address_state: AddressState | LookupFailure = (
        failure(name, "A") if address == "failed"
        else AddressState(address != "insecure", addresses, name, ttl))
    records = {"usable": (USABLE,), "unusable": (UNUSABLE,), "mixed": (UNUSABLE, USABLE), "none": (),
               "insecure": (USABLE,), "failed": (), None: ()}[tlsa]
    tlsa_state: TlsaState | LookupFailure | None = (
        None if tlsa is None else failure(tlsa_name(name), "TLSA") if tlsa == "failed"
        else TlsaState(tlsa_name(name), tlsa != "insecure", records, tlsa_ttl))
    return HostState(name, address_state, tlsa_state)


def inputs(*hosts: HostState, secure: bool = True, kind: MxKind = MxKind.RECORDS, ttl: int = 300) -> DaneInputs:
    names = tuple(h.host for h in hosts)
    return DaneInputs(DOMAIN, MxState(kind, secure, names, ttl), hosts)


def verdict(*hosts: HostState, **mx: object) -> Verdict:
    return decide(inputs(*hosts, **mx)).verdict  # type: ignore[arg-type]


# ----- row 1: the MX lookup failed ---------------------------------------------------------


def test_mx_lookup_failure_is_temp_and_never_mta_sts() -> None:
    decision = decide(DaneInputs(DOMAIN, failure(DOMAIN, "MX")))
    assert decision.verdict is Verdict.TEMP and decision.ttl == DaneTtl().temp
    assert socketmap_answer(decision) == f"TEMP DNSSEC lookup failed: {DOMAIN} MX: 127.0.0.1@53 answered SERVFAIL"
    assert exim_reply(decision) == f"temp DNSSEC lookup failed: {DOMAIN} MX: 127.0.0.1@53 answered SERVFAIL"


# ----- row 2: an address or TLSA lookup needed for the decision failed -------------------------


@pytest.mark.parametrize("failed", [host("mx2.example.test", address="failed"),
                                    host("mx2.example.test", tlsa="failed")])
def test_needed_address_or_tlsa_failure_is_temp(failed: HostState) -> None:
    """Even beside a host with usable TLSA: "dane-only" or "dane" cannot be told apart."""
    decision = decide(inputs(host("mx1.example.test"), failed))
    assert decision.verdict is Verdict.TEMP and "mx2.example.test" in decision.reason
    assert socketmap_answer(decision).startswith("TEMP ") and exim_reply(decision).startswith("temp ")


def test_failed_tlsa_lookup_of_an_insecure_host_is_not_needed() -> None:
    """RFC 7672 §2.2.2: TLSA records of a host with insecure addresses are not used at all."""
    assert verdict(host("mx1.example.test", address="insecure", tlsa="failed")) is Verdict.NONE
    assert verdict(host("mx1.example.test"), host("mx2.example.test", address="insecure", tlsa="failed"),
                   ) is Verdict.DANE


def test_failed_tlsa_lookup_of_a_host_without_address_is_not_needed() -> None:
    assert verdict(host("mx1.example.test"), host("gone.example.test", address="none", tlsa="failed"),
                   ) is Verdict.DANE_ONLY


# ----- row 3: DANE only -------------------------------------------------------------------


@pytest.mark.parametrize("tlsa", ["usable", "mixed"])
def test_secure_mx_every_host_with_usable_tlsa_is_dane_only(tlsa: str) -> None:
    decision = decide(inputs(host("mx1.example.test", tlsa=tlsa), host("mx2.example.test")))
    assert decision.verdict is Verdict.DANE_ONLY
    assert socketmap_answer(decision) == "OK dane-only" and exim_reply(decision) == "dane-only"


def test_no_mx_the_domain_itself_is_the_host() -> None:
    """RFC 7672 §2.2.2: no MX RRset (authenticated denial): the domain is the TLSA base domain."""
    assert verdict(host(DOMAIN), kind=MxKind.IMPLICIT) is Verdict.DANE_ONLY
    assert verdict(host(DOMAIN), kind=MxKind.IMPLICIT, secure=False) is Verdict.DANE
    assert verdict(host(DOMAIN, tlsa="none"), kind=MxKind.IMPLICIT) is Verdict.NONE


def test_hosts_without_address_do_not_count() -> None:
    assert verdict(host("mx1.example.test"), host("mx2.example.test", address="none", tlsa=None)) \
        is Verdict.DANE_ONLY


# ----- row 4: DANE (some secure TLSA, not row 3) --------------------------------------------


@pytest.mark.parametrize("case, hosts, mx_secure", [
    ("insecure MX RRset", [host("mx1.example.test")], False),
    ("mixed hosts: one has no TLSA", [host("mx1.example.test"), host("mx2.example.test", tlsa="none")], True),
    ("mixed hosts: one is insecure", [host("mx1.example.test"), host("mx2.example.test", address="insecure")], True),
    ("mixed hosts: one has insecure TLSA", [host("mx1.example.test"), host("mx2.example.test", tlsa="insecure")],
     True),
    ("only unusable TLSA", [host("mx1.example.test", tlsa="unusable")], True),
    ("usable and only-unusable hosts", [host("mx1.example.test"), host("mx2.example.test", tlsa="unusable")], True),
])
def test_some_secure_tlsa_but_not_dane_only_is_dane(case: str, hosts: list[HostState], mx_secure: bool) -> None:
    decision = decide(inputs(*hosts, secure=mx_secure))
    assert decision.verdict is Verdict.DANE, case
    assert socketmap_answer(decision) == "OK dane" and exim_reply(decision) == "dane"


# ----- row 5: no MX host has a secure TLSA RRset: MTA-STS answer unchanged -------------------


@pytest.mark.parametrize("case, hosts, mx_secure", [
    ("authenticated no TLSA", [host("mx1.example.test", tlsa="none")], True),
    ("insecure TLSA (AD=0) is ignored", [host("mx1.example.test", tlsa="insecure")], True),
    ("TLSA of an insecure host is ignored", [host("mx1.example.test", address="insecure")], True),
    ("unsigned zone with TLSA", [host("mx1.example.test", address="insecure", tlsa="insecure")], False),
    ("no host has an address", [host("mx1.example.test", address="none", tlsa=None)], True),
])
def test_no_secure_tlsa_leaves_the_mta_sts_answer(case: str, hosts: list[HostState], mx_secure: bool) -> None:
    decision = decide(inputs(*hosts, secure=mx_secure))
    assert decision.verdict is Verdict.NONE, case
    assert socketmap_answer(decision) is None and exim_reply(decision) is None


def test_null_mx_has_no_tls_policy() -> None:
    """RFC 7505 §3: the domain takes no mail."""
    decision = decide(DaneInputs(DOMAIN, MxState(MxKind.NULL, True, (), 300)))
    assert decision.verdict is Verdict.NONE and "null MX" in decision.reason


# ----- TTL: the minimum TTL of the records that decided it, clamped ----------------------------


def test_ttl_is_the_minimum_of_the_deciding_records() -> None:
    decision = decide(inputs(host("mx1.example.test", ttl=900, tlsa_ttl=700),
                             host("mx2.example.test", ttl=400, tlsa_ttl=800), ttl=1200))
    assert decision.ttl == 400


def test_ttl_ignores_tlsa_that_did_not_count() -> None:
    """An insecure host's TLSA TTL (records that did not decide anything) does not shorten it."""
    decision = decide(inputs(host("mx1.example.test", address="insecure", ttl=500, tlsa_ttl=70), ttl=1000))
    assert decision.verdict is Verdict.NONE and decision.ttl == 500


@pytest.mark.parametrize("record_ttl, expected", [(5, 60), (0, 60), (600, 600), (86400, 3600)])
def test_ttl_is_clamped(record_ttl: int, expected: int) -> None:
    assert decide(inputs(host("mx1.example.test", ttl=record_ttl, tlsa_ttl=record_ttl), ttl=record_ttl)).ttl == expected


def test_ttl_limits_are_parameters() -> None:
    limits = DaneTtl(min=10, max=20, temp=1)
    assert decide(inputs(host("mx1.example.test", ttl=15, tlsa_ttl=15), ttl=15), limits).ttl == 15
    assert decide(inputs(host("mx1.example.test", ttl=5000)), limits).ttl == 20
    assert decide(DaneInputs(DOMAIN, failure(DOMAIN, "MX")), limits).ttl == 1


# ----- replies are single bounded lines ------------------------------------------------------


def test_temp_reason_is_one_bounded_printable_line() -> None:
    nasty = LookupFailure("mx.example.test", "A", "line one\r\nline two\x00" + "x" * 500)
    decision = decide(DaneInputs(DOMAIN, MxState(MxKind.RECORDS, True, ("mx.example.test",), 300),
                                 (HostState("mx.example.test", nasty, None),)))
    reply = exim_reply(decision)
    assert reply is not None and "\n" not in reply and "\r" not in reply and "\x00" not in reply
    assert "line one line two" in reply and len(decision.reason) <= 200


def test_every_verdict_has_a_socketmap_and_an_exim_form() -> None:
    for kind in Verdict:
        decision = DaneDecision(DOMAIN, kind, 60, "why")
        assert (socketmap_answer(decision) is None) is (exim_reply(decision) is None) is (kind is Verdict.NONE)


# ----- TLSA usability: RFC 7672 §3.1 -------------------------------------------------------------


@pytest.mark.parametrize("record", [
    Tlsa(3, 1, 1, b"\x01" * 32),  # DANE-EE SPKI SHA2-256: the common choice (RFC 7672 §3.1.1)
    Tlsa(3, 0, 1, b"\x01" * 32),  # DANE-EE Cert
    Tlsa(2, 0, 1, b"\x01" * 32),  # DANE-TA (RFC 7672 §3.1.2)
    Tlsa(2, 1, 2, b"\x01" * 64),  # SHA2-512
    Tlsa(3, 1, 0, b"\x30\x82"),  # Full: the data itself, any length
])
def test_usable_tlsa(record: Tlsa) -> None:
    assert record.usable and record.unusable_reason is None


@pytest.mark.parametrize("record, why", [
    (Tlsa(0, 0, 1, b"\x01" * 32), "usage 0"),  # PKIX-TA: RFC 7672 §3.1.3
    (Tlsa(1, 1, 1, b"\x01" * 32), "usage 1"),  # PKIX-EE: RFC 7672 §3.1.3
    (Tlsa(4, 1, 1, b"\x01" * 32), "usage 4"),
    (Tlsa(3, 2, 1, b"\x01" * 32), "selector 2"),
    (Tlsa(3, 1, 3, b"\x01" * 32), "matching type 3"),
    (Tlsa(3, 1, 1, b"\x01" * 31), "needs 32 bytes"),  # a SHA2-256 digest that cannot match
    (Tlsa(3, 1, 2, b"\x01" * 32), "needs 64 bytes"),
    (Tlsa(3, 1, 0, b""), "no certificate association data"),
])
def test_unusable_tlsa(record: Tlsa, why: str) -> None:
    assert not record.usable and why in (record.unusable_reason or "")


def test_tlsa_status() -> None:
    assert TlsaState("n.", True, (USABLE,), 1).status is TlsaStatus.SECURE
    assert TlsaState("n.", True, (), 1).status is TlsaStatus.SECURE_NONE
    assert TlsaState("n.", False, (USABLE,), 1).status is TlsaStatus.INSECURE
    assert TlsaState("n.", True, (UNUSABLE, USABLE), 1).usable == (USABLE,)


def test_tlsa_name() -> None:
    """RFC 6698 §3: _port._protocol.host."""
    assert tlsa_name("mx.example.test") == tlsa_name("mx.example.test.") == "_25._tcp.mx.example.test."
