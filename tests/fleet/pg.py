"""A throwaway PostgreSQL cluster for the fleet tests: initdb + pg_ctl in a temporary
directory, on a free loopback port, as an unprivileged user (the server refuses root).

The binaries come from Debian's `postgresql` package (/usr/lib/postgresql/*/bin; .ci/run
installs it). Locally a missing server skips the fleet tests with the reason; under CI
(the CI environment variable set) it fails them instead, so CI never passes by skipping.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

UNPRIVILEGED_USER = "postgres"
"""Created by the Debian package; the cluster runs as this user when the tests run as root."""


def find_bin_dir() -> Path | None:
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        found = shutil.which("initdb")
        return Path(found).parent if found else None
    newest = max(candidates, key=lambda p: [int(x) for x in Path(p).parent.parent.name.split(".") if x.isdigit()] or [0])
    return Path(newest).parent


def require_postgres() -> Path:
    bin_dir = find_bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        reason = "PostgreSQL is not installed (Debian package 'postgresql'; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the fleet tests, not skip them", pytrace=False)
        pytest.skip(reason)
    return bin_dir


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct free ports: all sockets stay bound until every port is chosen (one at a
    time, the kernel may hand out the same port twice in a row)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Cluster:
    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="carbon-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = UNPRIVILEGED_USER
            entry = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        os.chmod(self.base, 0o700)

    def _run(self, *args: str) -> None:
        subprocess.run([str(a) for a in args], check=True, capture_output=True, user=self.user, cwd=self.base, timeout=120)

    def init(self) -> None:
        self._run(self.bin_dir / "initdb", "-D", self.data, "-U", "carbon", "-A", "trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-l", self.base / "server.log", "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://carbon@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.SubprocessError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)
