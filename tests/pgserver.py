"""A throwaway PostgreSQL server for the tests: ``initdb`` in a temporary directory, a free port on
127.0.0.1, stopped (and its files removed) at the end. As root, the cluster runs as the ``postgres``
user that Debian's package creates (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from serverproc import free_port


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


def unavailable() -> str | None:
    """Why no server can be started here (None: it can)."""
    if not (_bin("initdb") and _bin("pg_ctl")):
        return "PostgreSQL is not installed (Debian: apt-get install postgresql; `make test` tries)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


class PostgresServer:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="sinkstream-pg-"))
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run(prefix + list(cmd), check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql://{self.user or os.environ.get('USER', 'postgres')}@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresServer:
        if self.user:
            shutil.chown(self.dir, self.user)
        data = str(self.dir / "data")
        self._run(_bin("initdb"), "-D", data, "-A", "trust", "-U", self.user or os.environ.get("USER", "postgres"))
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=on"
        self._run(_bin("pg_ctl"), "-D", data, "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        return self

    def fresh_database(self, name: str) -> str:
        """The URL of a new, empty database ``name`` on this server."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        try:
            self._run(_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
