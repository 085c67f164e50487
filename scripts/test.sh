#!/usr/bin/env bash
# The project's one test command (README, CI): install everything, then run the suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k streaming` or `--soak`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export JAVA_HOME=${JAVA_HOME:-/usr/lib/jvm/java-17-openjdk-amd64}
# pytest-xvfb starts a virtual display for the napari tests; QT_QPA_PLATFORM=offscreen
# cannot render (no OpenGL), so make sure it is not set.
unset QT_QPA_PLATFORM
exec python3 -m pytest "$@"
