#!/usr/bin/env bash
# Run polystore_receiver.groovy headless, the same script Fiji runs. Arguments as for Fiji's --run:
#   viewers/fiji/run_headless.sh 'endpoint="tcp://127.0.0.1:55556",output_dir="/tmp/out"'
# By default with Debian's groovy (2.4), ImageJ and JeroMQ (0.3.6), installed by scripts/install.sh.
# What current Fiji runs (Groovy 4, JeroMQ 0.6): set GROOVY_JARS to the Groovy jars (colon-separated,
# groovy-json included) and JEROMQ_JAR to jeromq-0.6.0.jar; the script then runs on `java` itself:
#   GROOVY_JARS=../shared/vendor/groovy-4.0.26.jar:../shared/vendor/groovy-json-4.0.26.jar \
#   JEROMQ_JAR=../shared/vendor/jeromq-0.6.0.jar viewers/fiji/run_headless.sh 'endpoint="..."'
# Override ImageJ with IJ_JAR, the JVM with JAVA_HOME, its options with JAVA_OPTS.
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
if [ -n "${GROOVY_JARS:-}" ]; then
  # shellcheck disable=SC2086 # JAVA_OPTS is a list of options
  exec "$JAVA_HOME/bin/java" $JAVA_OPTS -cp "$GROOVY_JARS:$IJ_JAR:$JEROMQ_JAR" groovy.ui.GroovyMain \
    "$here/headless.groovy" "$here/polystore_receiver.groovy" "$@"
fi
exec groovy -cp "$IJ_JAR:$JEROMQ_JAR" "$here/headless.groovy" "$here/polystore_receiver.groovy" "$@"
