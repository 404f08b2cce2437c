"""Pure RFC logic, no I/O: names, the _mta-sts TXT record, the policy file, the TLSRPT record,
the failure taxonomy, operator overrides."""
