"""Cleaning MTA lookup keys into policy domains (Postfix next-hop syntax, RFC 8461 §3.4)."""

import pytest

from mtasts_policyd.core.names import clean_key, to_alabel

pytestmark = pytest.mark.fast  # pure: no sockets, no processes


@pytest.mark.parametrize("key,domain", [
    ("example.com", "example.com"),
    ("Example.COM.", "example.com"),  # Postfix does not fold case for socketmap keys
    ("[mx.example.com]", "mx.example.com"),
    ("[mx.example.com]:587", "mx.example.com"),
    ("example.com:25", "example.com"),
    ("ätsch.de", "xn--tsch-koa.de"),  # SMTPUTF8 next hop: U-label to A-label
    ("BÜCHER.example", "xn--bcher-kva.example"),
])
def test_keys_cleaned(key, domain):
    assert clean_key(key) == domain


@pytest.mark.parametrize("key", [
    ".example.com",  # Postfix parent-domain walk; RFC 8461 §3.4 forbids parent policies
    "192.0.2.1", "[192.0.2.1]", "[192.0.2.1]:25", "[ipv6:2001:db8::1]", "2001:db8::1",  # §3.4 literals
    "", "   ", "exa mple.com", "a..b", "-a.example", "x_y.example", "foo.123", "a" * 64 + ".example",
    "[unterminated", "[a.example]x", "example.com:port",
    "bad..", "e1.example......", "example.com..", ".", "..",  # one trailing dot is the root, no more
])
def test_keys_without_policy(key):
    assert clean_key(key) is None


def test_to_alabel_rejects_overlong_names():
    assert to_alabel(".".join(["a" * 60] * 5)) is None


def test_mail_hosts_one_rule_for_mta_sts_and_dane():
    """RFC 5321 §5.1 / RFC 7672 §2.2.2: no MX RRset means the domain itself; RFC 7505: a null MX
    means no host; names fold to lowercase without the root dot, each once, in preference order."""
    from mtasts_policyd.core.names import mail_hosts

    assert mail_hosts("example.com", None) == ("example.com",)
    assert mail_hosts("example.com", ["."]) == ()
    assert mail_hosts("example.com", ["MX2.Example.com.", "mx1.example.com", "mx2.example.com"]) == (
        "mx2.example.com", "mx1.example.com")
