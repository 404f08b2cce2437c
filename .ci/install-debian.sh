#!/usr/bin/env bash
# Installs the Debian packages the test suite drives, without starting any of them as a service:
# - postfix (postmap, and a real postfix started by the end-to-end tests with its own config);
# - exim4-daemon-light unpacked into /opt/exim4 (Debian will not install both MTAs side by side,
#   both provide mail-transport-agent), with the libraries it needs and the Debian-exim user;
# - nsd and unbound: the DNSSEC test world (tests/rig/dnssec.py) runs its own instances on loopback;
# - redis-server: the fleet tests (tests/rig/redis_server.py) run their own on loopback.
set -euo pipefail
EXIM_ROOT=/opt/exim4
updated=
apt_update() { [ -n "$updated" ] || { apt-get update -qq; updated=1; }; }
export DEBIAN_FRONTEND=noninteractive

need=()
command -v postmap >/dev/null 2>&1 || need+=(postfix)
for pkg in libidn12 libgnutls-dane0 libdb5.3 libpcre2-8-0 libnsl2 iproute2 ca-certificates nsd unbound redis-server; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
# Debian's own python3 needs python3-venv for `python3 -m venv` (.ci/run installs into a venv).
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt_update
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x "$EXIM_ROOT/usr/sbin/exim4" ]; then
  apt_update
  work=$(mktemp -d)
  (cd "$work" && apt-get download -qq exim4-daemon-light exim4-base 2>/dev/null)
  mkdir -p "$EXIM_ROOT"
  for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$EXIM_ROOT"; done
  rm -rf "$work"
fi
getent group Debian-exim >/dev/null || groupadd --system Debian-exim
getent passwd Debian-exim >/dev/null || useradd --system --gid Debian-exim --home-dir /var/spool/exim4 \
  --shell /usr/sbin/nologin Debian-exim
"$EXIM_ROOT/usr/sbin/exim4" -C /dev/null -bV >/dev/null 2>&1 || { echo "unpacked exim4 does not run" >&2; exit 1; }
