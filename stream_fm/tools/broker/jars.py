"""The Apache Kafka broker's jars: fetched once from Maven Central with Maven into a local
cache (or taken from an installation named by ``KAFKA_HOME``).

The fetch goes to a temporary directory renamed into place after a marker file is written,
under a file lock, so a crashed or concurrent earlier run never leaves a half-filled cache.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from stream_fm.errors import BrokerStartError
from stream_fm.tools.process import tail_text

KAFKA_VERSION = "4.4.0"
SCALA_VERSION = "2.13"
#: The log4j-core that kafka-server 4.4.0 depends on. The slf4j binding below is not a
#: transitive dependency of the published POMs (the release tarball adds it), so without it
#: every slf4j log line of the broker would be dropped; api/core/binding are pinned together
#: so Maven's nearest-wins cannot mix two log4j versions.
LOG4J_VERSION = "2.25.5"
#: Pinned because Maven 3.8's default (2.8, from 2013) is ancient and the prefix lookup would
#: otherwise vary between machines.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
DOCKER_ALTERNATIVE = "docker compose -f deploy/docker-compose.yml up"

_MARKER = ".complete"
_MVN_TIMEOUT_S = 900.0


def default_cache_root() -> Path:
    """``$STREAM_FM_KAFKA_CACHE``, else ``$XDG_CACHE_HOME/stream-fm``, else ``~/.cache/stream-fm``."""
    env = os.environ.get("STREAM_FM_KAFKA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "stream-fm"


def _pom(version: str) -> str:
    deps = [
        ("org.apache.kafka", f"kafka_{SCALA_VERSION}", version),
        ("org.apache.logging.log4j", "log4j-api", LOG4J_VERSION),
        ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
        # slf4j 1.7 binding: kafka 4.x still compiles against slf4j-api 1.7.36.
        ("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION),
    ]
    body = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.stream-fm</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{body}
  </dependencies>
</project>
"""


def mvn_command(pom: Path, out_dir: Path) -> list[str]:
    """The exact Maven invocation used to fetch the broker's runtime jars."""
    mvn = shutil.which("mvn") or "mvn"
    return [
        mvn, "-q", "-B", "-f", str(pom),
        f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        f"-DoutputDirectory={out_dir}",
        "-DincludeScope=runtime",
    ]  # fmt: skip


def _kafka_home_classpath(home: str) -> str:
    libs = Path(home).expanduser() / "libs"
    if not any(libs.glob("kafka_*.jar")):
        raise BrokerStartError(
            f"KAFKA_HOME={home} is not an Apache Kafka installation (no libs/kafka_*.jar); "
            f"unset it to fetch Kafka {KAFKA_VERSION} from Maven Central, "
            f"or run `{DOCKER_ALTERNATIVE}`"
        )
    return str(libs / "*")


def kafka_version() -> str:
    """The Kafka release to fetch: ``$STREAM_FM_KAFKA_VERSION`` (a 4.x), else ``KAFKA_VERSION``."""
    version = os.environ.get("STREAM_FM_KAFKA_VERSION", "").strip() or KAFKA_VERSION
    # server.properties and the log4j2 binding below are written for the 4.x line.
    if not re.fullmatch(r"4\.\d+\.\d+", version):
        raise BrokerStartError(
            f"STREAM_FM_KAFKA_VERSION={version}: expected an Apache Kafka 4.x release like "
            f"{KAFKA_VERSION}"
        )
    return version


def kafka_classpath(cache_dir: Path | None = None, version: str | None = None) -> str:
    """Return a Java classpath (``dir/*``) holding a complete Apache Kafka broker.

    ``$KAFKA_HOME/libs`` when ``KAFKA_HOME`` is set; otherwise the jars of ``version`` (default
    ``kafka_version()``) fetched from Maven Central with Maven into
    ``<cache_dir or default_cache_root()>/kafka-<version>/libs``. The
    fetch happens once: it goes to a temporary directory that is renamed into place after a
    marker file is written, under a file lock, so a crashed or concurrent earlier run never
    leaves a half-filled cache behind.
    """
    home = os.environ.get("KAFKA_HOME")
    if home:
        return _kafka_home_classpath(home)

    version = version or kafka_version()
    root = (cache_dir or default_cache_root()) / f"kafka-{version}"
    libs = root / "libs"
    if (libs / _MARKER).is_file():
        return str(libs / "*")

    if shutil.which("mvn") is None:
        raise BrokerStartError(
            f"Maven (mvn) not found: it is needed once to fetch Apache Kafka {version} from "
            f"Maven Central; install Maven, set KAFKA_HOME to a Kafka installation, "
            f"or run `{DOCKER_ALTERNATIVE}`"
        )
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        # Another process (e.g. a second test session) may be downloading the same version.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (libs / _MARKER).is_file():
            return str(libs / "*")
        # Leftovers of a fetch that was killed; nobody else can be fetching while we hold the lock.
        for stale in root.glob("fetch-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix="fetch-", dir=root))
        try:
            pom = tmp / "pom.xml"
            pom.write_text(_pom(version))
            out = tmp / "libs"
            cmd = mvn_command(pom, out)
            try:
                proc = subprocess.run(
                    cmd, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                    timeout=_MVN_TIMEOUT_S, check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise BrokerStartError(
                    f"fetching Apache Kafka {version} with Maven timed out after "
                    f"{_MVN_TIMEOUT_S:.0f}s: {' '.join(cmd)}"
                ) from exc
            if proc.returncode != 0:
                tail = tail_text(proc.stdout + proc.stderr, 30)
                raise BrokerStartError(
                    f"fetching Apache Kafka {version} from Maven Central failed "
                    f"(mvn exit {proc.returncode}): {' '.join(cmd)}\n{tail}"
                )
            jars = sorted(p.name for p in out.glob("*.jar"))
            if f"kafka_{SCALA_VERSION}-{version}.jar" not in jars:
                raise BrokerStartError(
                    f"Maven finished but kafka_{SCALA_VERSION}-{version}.jar is missing in {out}"
                )
            (out / _MARKER).write_text("\n".join([f"kafka {version}", *jars]) + "\n")
            # A directory without the marker is a leftover of an interrupted older layout.
            if libs.exists():
                shutil.rmtree(libs)
            os.replace(out, libs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(libs / "*")


def classpath_version(classpath: str) -> str:
    for jar in Path(classpath.rstrip("*")).glob("kafka_*.jar"):
        m = re.match(r"kafka_[\d.]+-(\d+\.\d+\.\d+[^/]*?)\.jar$", jar.name)
        if m:
            return m.group(1)
    return "unknown"
