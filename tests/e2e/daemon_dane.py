"""The daemon's `dane` configuration in the end-to-end world.

issue 9: "probe: a name and type that must come back with AD from a validating resolver; the tests
set it to their signed test zone". test. is signed and delegated from the signed root.
"""

from __future__ import annotations

DANE_CONFIG = {"probe": "test. NS"}


def daemon_dane_config() -> dict[str, dict[str, str]]:
    """The `dane` section of the world's daemon (README "DANE")."""
    return {"dane": DANE_CONFIG}
