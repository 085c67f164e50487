#!/usr/bin/env bash
# Run polystore_receiver.groovy headless with Debian's groovy, ImageJ and JeroMQ (installed by
# scripts/install.sh), the same script Fiji runs. Arguments as for Fiji's --run:
#   viewers/fiji/run_headless.sh 'endpoint="tcp://127.0.0.1:55556",output_dir="/tmp/out"'
# Override the jars with IJ_JAR / JEROMQ_JAR, the JVM with JAVA_HOME, its options with JAVA_OPTS.
# POLYSTORE_FIJI_GUI=1 (with a display, e.g. xvfb-run) runs it with ImageJ's GUI instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "${JAVA_HOME:-}" ]; then
  # Debian's Groovy 2.4 needs JAVA_HOME; prefer Java 17, which it is known to run on.
  for candidate in /usr/lib/jvm/java-17-openjdk-amd64 /usr/lib/jvm/java-17-openjdk-arm64 /usr/lib/jvm/default-java; do
    if [ -x "$candidate/bin/java" ]; then JAVA_HOME=$candidate; break; fi
  done
fi
export JAVA_HOME
IJ_JAR=${IJ_JAR:-/usr/share/java/ij.jar}
JEROMQ_JAR=${JEROMQ_JAR:-/usr/share/java/jeromq.jar}
for jar in "$IJ_JAR" "$JEROMQ_JAR"; do
  [ -f "$jar" ] || { echo "run_headless.sh: $jar not found (run scripts/install.sh)" >&2; exit 2; }
done
if [ "${POLYSTORE_FIJI_GUI:-}" = 1 ]; then
  export JAVA_OPTS="${JAVA_OPTS:-}"  # GUI path (needs a display), see headless.groovy
else
  export JAVA_OPTS="-Djava.awt.headless=true ${JAVA_OPTS:-}"
fi
exec groovy -cp "$IJ_JAR:$JEROMQ_JAR" "$here/headless.groovy" "$here/polystore_receiver.groovy" "$@"
