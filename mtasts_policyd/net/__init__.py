"""The network behind small interfaces: DNS (dnspython), the trust store, HTTPS (requests)."""
