"""``polystore fiji``: where the Fiji receiver script is, or run it headless (Debian's
ImageJ, JeroMQ and Groovy: no Fiji needed)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from polystore.apps.arguments import CommandError, fiji_endpoint


def source_root() -> Path:
    """The source checkout this package runs from (viewers/ and scripts/ live there)."""
    return Path(__file__).resolve().parents[2]


#: what ImageJ's parameter string cannot carry inside a quoted value
UNQUOTABLE = set('"\\,\n\r')


def fiji_dir() -> Path:
    """viewers/fiji of the source checkout (it is not part of the installed package)."""
    return source_root() / "viewers" / "fiji"


def fiji_missing() -> list[str]:
    """What the headless Fiji receiver needs and this machine lacks."""
    missing = []
    if shutil.which("groovy") is None:
        missing.append("groovy (apt-get install groovy)")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        missing.append("Java (apt-get install openjdk-17-jre-headless)")
    for env, default, package in (("IJ_JAR", "/usr/share/java/ij.jar", "libij-java"),
                                  ("JEROMQ_JAR", "/usr/share/java/jeromq.jar",
                                   "libjeromq-java")):  # fmt: skip
        jar = os.environ.get(env, default)
        if not Path(jar).is_file():
            missing.append(f"{jar} (apt-get install {package}, or set ${env})")
    if not (fiji_dir() / "run_headless.sh").is_file():
        missing.append(f"{fiji_dir() / 'run_headless.sh'} (part of the polystore source tree)")
    return missing


def jeromq_has_curve() -> bool:
    """Whether the JeroMQ jar run_headless.sh uses has CURVE (0.5 and newer)."""
    import zipfile

    jar = os.environ.get("JEROMQ_JAR", "/usr/share/java/jeromq.jar")
    try:
        with zipfile.ZipFile(jar) as archive:
            return "org/zeromq/ZMQ$Curve.class" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def cmd_fiji(args: argparse.Namespace) -> int:
    from polystore.streaming import FijiStreamingBackend

    script = fiji_dir() / "polystore_receiver.groovy"
    if not script.is_file():
        raise CommandError(
            f"the Fiji receiver script is not at {script}: it ships with the polystore source "
            "(viewers/fiji/polystore_receiver.groovy), not with an installed wheel. Get the "
            "source and run `polystore fiji` from an editable install (pip install -e .)"
        )
    try:
        endpoint = args.endpoint or fiji_endpoint(FijiStreamingBackend.default_endpoint())
    except argparse.ArgumentTypeError as exc:
        raise CommandError(f"$POLYSTORE_FIJI_ENDPOINT: {exc}") from None
    if not args.run:
        print(f"Fiji receiver script: {script}\n")
        print("Install it in Fiji (details: docs/fiji.md):")
        print("  1. put the JeroMQ jar (jeromq-<version>.jar, from Maven Central) into "
              "Fiji.app/jars/")
        print(f"  2. copy {script.name} into Fiji.app/scripts/Plugins/polystore/ and restart "
              "Fiji\n     (or open it in Fiji's script editor and press Run)")
        print(f"  3. run it from the Plugins menu; keep the endpoint {endpoint} (or make the "
              "sender use the same one)")
        print("\nThen stream: fm.save(img, 'A01/t000.tif', backend='fiji_stream')  or  "
              "polystore send FILES --to fiji_stream")
        print("Without Fiji (Debian's ImageJ + JeroMQ + Groovy): polystore fiji --run")
        return 0
    if args.output_dir:
        output = Path(args.output_dir).resolve()
        if UNQUOTABLE & set(str(output)):
            raise CommandError(f"--output-dir {str(output)!r}: ImageJ's script parameters "
                               "cannot carry a path with a quote, backslash, comma or line "
                               "break (the receiver would save elsewhere); choose another "
                               "folder")
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"--output-dir: cannot make the folder {output}: "
                               f"{exc.strerror or exc}") from None
    missing = fiji_missing()
    if missing:
        raise CommandError(
            "cannot run the Fiji receiver headless; missing: " + "; ".join(missing)
            + ". `bash scripts/install.sh` installs all of them"
        )  # fmt: skip
    params = [f'endpoint="{endpoint}"']
    if not jeromq_has_curve():  # Debian's JeroMQ 0.3: the script refuses unless told
        if os.environ.get("POLYSTORE_AUTH") != "none":
            raise CommandError(
                "this JeroMQ (0.3, Debian's) cannot authenticate senders, so the receiver would "
                "accept any local account. Set JEROMQ_JAR to a jeromq-0.6.0.jar, or run "
                "unauthenticated on purpose with POLYSTORE_AUTH=none (for the senders too)"
            )  # fmt: skip
        params.append("allow_unauthenticated=true")
    if args.output_dir:
        params.append(f'output_dir="{output}"')
    launcher = fiji_dir() / "run_headless.sh"
    print(f"polystore fiji: starting the headless receiver on {endpoint} (Ctrl+C stops it)",
          flush=True)
    sys.stderr.flush()
    # exec: this process becomes the receiver, so signals (Ctrl+C, SIGTERM) reach it directly
    os.execv("/bin/bash", ["bash", str(launcher), ",".join(params)])
    return 0  # pragma: no cover - execv does not return
