"""A private, throwaway PostgreSQL cluster for tests that must stop the server (crash
tests): ``initdb`` into a temporary directory, trust auth, listening on 127.0.0.1 on a
free port and on a unix socket in that directory. The machine's shared server (which
other tests and engineers use) is never touched.

initdb and postgres refuse to run as root: as root, every server command runs as the
``postgres`` OS user (``runuser``), in a directory under /tmp chowned to it. Every
subprocess has a timeout, and ``close()`` stops the cluster (immediately) and removes
the directory whatever state it is in.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

COMMAND_TIMEOUT = 60  # seconds for any one server command (initdb, pg_ctl)


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: ``pg_config --bindir``, else the newest
    /usr/lib/postgresql/*/bin; None if there is none."""
    candidates: list[str] = []
    if os.environ.get("INCIDENT_TEST_PG_BINDIR"):
        candidates.append(os.environ["INCIDENT_TEST_PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates.extend(sorted(versions, key=lambda p: int(Path(p).parent.name), reverse=True))
    for candidate in candidates:
        bindir = Path(candidate)
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateCluster:
    """One throwaway cluster. ``start()``, ``crash()`` (``pg_ctl stop -m immediate``: no
    checkpoint, so the next start runs WAL crash recovery), ``start()`` again on the
    same port, ``close()``. ``settings`` are extra ``-c name=value`` server settings."""

    def __init__(self, bindir: Path, *, settings: Sequence[str] = ()) -> None:
        self.bindir = bindir
        self.settings = list(settings)
        self.as_root = os.geteuid() == 0
        # under /tmp (which every user can traverse), short enough for a socket path
        self.dir = Path(tempfile.mkdtemp(prefix="incident-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._initdb()

    # -- commands -----------------------------------------------------------------------

    def _run(
        self, *args: str, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=self.dir
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}\n{self.log_tail()}"
            )
        return result

    def _initdb(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
            "--no-sync", "--no-instructions",
        )  # fmt: skip

    def start(self) -> None:
        """Start the server (on a free port the first time, on the same port after) and
        wait until it accepts connections."""
        attempts = 1 if self.port else 5
        for attempt in range(attempts):
            port = self.port or free_port()
            options = [f"-p {port}", f"-k {self.dir}", "-c listen_addresses=127.0.0.1"]
            options += [f"-c {setting}" for setting in self.settings]
            try:
                self._run(
                    "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", " ".join(options),
                    "-w", "-t", "30", "start",
                )  # fmt: skip
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                continue  # another process took the port meanwhile: try another
            self.port = port
            return

    def crash(self) -> None:
        """Stop at once, as a crash would: no shutdown checkpoint."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")

    def running(self) -> bool:
        command = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        try:
            result = subprocess.run(command, capture_output=True, timeout=COMMAND_TIMEOUT)
        except (OSError, subprocess.SubprocessError):
            return True  # cannot tell: close() stops it anyway
        return result.returncode == 0

    def close(self) -> None:
        """Stop the server if it runs, whatever happened, and remove the directory."""
        try:
            if self.data.exists() and self.running():
                try:
                    self.crash()
                except (RuntimeError, subprocess.SubprocessError, OSError):
                    self._kill_postmaster()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """The last resort when pg_ctl could not stop it: SIGKILL the postmaster (its
        children exit once it is gone)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 9)
            time.sleep(0.5)
        except (OSError, ValueError, IndexError):
            pass

    # -- use ------------------------------------------------------------------------------

    def url(self, database: str = "postgres", **query: str) -> str:
        params = "&".join(f"{key}={value}" for key, value in query.items())
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}" + (
            f"?{params}" if params else ""
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"
