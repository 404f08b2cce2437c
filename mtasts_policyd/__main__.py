"""`python -m mtasts_policyd` and the `mtasts-policyd` console script."""

import sys

from mtasts_policyd.runtime.signals import catch_early_hup

catch_early_hup()  # first: the imports below take a while, and SIGHUP must not end a starting daemon

from mtasts_policyd.commands.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
