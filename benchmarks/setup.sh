#!/usr/bin/env bash
# Installs the offline text that benchmarks/data.py's "prose" domain reads:
# Jane Austen's six novels from Debian's r-cran-janeaustenr (see data.py for
# why that source). The "code" domain needs nothing beyond Python itself.
#
#     bash benchmarks/setup.sh        # as root, or as a user with sudo
#
# Idempotent: does nothing when the package is already installed. apt pulls in
# r-base-core as a dependency; R itself is never run (data.py reads the
# package's data file directly).
set -euo pipefail

package=r-cran-janeaustenr

if dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
    echo "setup.sh: $package already installed"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "$package"
echo "setup.sh: installed $package"
