"""Test rig: real loopback servers (DNS, HTTPS) for exercising the daemon end to end.

The servers speak the real wire protocols so the daemon's production resolver and
HTTP client code paths are tested unchanged; only the addresses point at loopback.
"""

from .dns_server import DnsServer
from .policy_server import PolicyServer, make_ca
from .scripted_dns import Datagram, ScriptedDns
from .smtp_server import SmtpServer

__all__ = ["Datagram", "DnsServer", "PolicyServer", "ScriptedDns", "SmtpServer", "make_ca"]
