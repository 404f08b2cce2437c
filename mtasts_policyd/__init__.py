"""mtasts-policyd: an MTA-STS (RFC 8461) policy service for Postfix and Exim."""

__version__ = "0.1.0"
