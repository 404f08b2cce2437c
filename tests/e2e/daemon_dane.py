"""Whether the daemon answers DANE yet, and its `dane` configuration in the end-to-end world.

Issue 9's daemon side (the `dane:` configuration section, `OK dane-only` / `OK dane` / `TEMP`
socketmap answers and `dane-only` / `dane` / `temp` Exim replies) comes from another branch
(i9-daemon). Until it is merged, `mtasts-policyd serve` refuses the `dane` key, and the tests that
need the daemon's DANE answers skip, saying so; they never pass without running. The MTA side is
proven meanwhile with fixed answers (a Postfix texthash map, an Exim stand-in listener).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml

from mtasts_policyd.runtime.config import ConfigError, load

# issue 9: "probe: a name and type that must come back with AD from a validating resolver; the
# tests set it to their signed test zone". test. is signed and delegated from the signed root.
DANE_CONFIG = {"probe": "test. NS"}


def dane_refused() -> str | None:
    """Why the daemon's configuration loader refuses the `dane` section (None: it takes it). Only an
    unknown `dane` key counts as "not there yet"; any other refusal is left to fail the daemon's
    start loudly."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "dane.yaml"
        path.write_text(yaml.safe_dump({"dane": DANE_CONFIG}))
        try:
            load(str(path))
        except ConfigError as exc:
            if "unknown key" in str(exc) and "dane" in str(exc):
                return str(exc).rsplit(": ", 1)[-1]  # without the temporary file's name
    return None


REFUSED = dane_refused()
needs_daemon_dane = pytest.mark.skipif(
    REFUSED is not None,
    reason=f"waits on the daemon's DANE answers (issue 9, branch i9-daemon, not merged): mtasts-policyd serve "
           f"refuses the configuration key `dane` ({REFUSED})")


def daemon_dane_config() -> dict[str, dict[str, str]]:
    """The `dane` section for the world's daemon: the contract's, once the daemon takes it."""
    return {} if REFUSED is not None else {"dane": DANE_CONFIG}
