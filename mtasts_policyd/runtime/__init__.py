"""Configuration and the daemon's wiring: what serve builds and runs."""
