"""Finding a Java 17+ to run the broker with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from stream_fm.errors import BrokerStartError
from stream_fm.tools.broker.jars import DOCKER_ALTERNATIVE

MIN_JAVA = 17


def find_java() -> str:
    """Path of a Java 17+ ``java``; ``$JAVA_HOME/bin/java`` wins over ``PATH``."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate and candidate.is_file() else shutil.which("java")
    if java is None:
        raise BrokerStartError(
            f"Java {MIN_JAVA}+ not found (no `java` on PATH or in JAVA_HOME): install a JDK "
            f"{MIN_JAVA}+ to run the local Apache Kafka broker, or run `{DOCKER_ALTERNATIVE}`"
        )
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerStartError(f"`{java} -version` failed: {exc}") from exc
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if m is None:
        raise BrokerStartError(f"cannot tell the version of {java}: {out.stderr.strip()[:200]}")
    # Java 8 and older report "1.8.0_..."
    major = int(m.group(2) or 0) if m.group(1) == "1" else int(m.group(1))
    if major < MIN_JAVA:
        raise BrokerStartError(
            f"Java {major} found at {java}, but Apache Kafka 4 needs Java {MIN_JAVA}+: install "
            f"a newer JDK (or set JAVA_HOME), or run `{DOCKER_ALTERNATIVE}`"
        )
    return java
