#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine: apt packages
# (Xvfb + GL for napari, ImageJ/JeroMQ/Groovy for the Fiji script) and the Python
# packages (polystore with its extras and the napari plugin). Nothing from tests/ is installed:
# the test session installs its test-only plugin packages itself (tests/conftest.py), so the
# custom-backends guide's example names stay free in this environment.
# Idempotent: skips apt when every package is already present.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
  libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0
  libxcb-xkb1 libxcb-cursor0 libdbus-1-3 libfontconfig1
  openjdk-17-jre-headless libij-java libjeromq-java groovy
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[install] apt packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
echo "[install] python packages"
$PY -m pip install -q --disable-pip-version-check \
  -e ".[napari,zarr,s3,rois,dev]" \
  -e viewers/napari
