#!/usr/bin/env bash
# Installs the Debian packages the test suite drives: Postfix (postmap, and later a real postfix).
# Nothing is started as a service: policy-rc.d refuses every start during the install.
set -euo pipefail
need=()
command -v postmap >/dev/null 2>&1 || need+=(postfix)
if [ ${#need[@]} -gt 0 ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
