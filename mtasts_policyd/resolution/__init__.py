"""The resolution algorithm (RFC 8461 §3.3, §5.1, §10.2) and its asynchronous face."""
