"""Packages from Debian's bookworm-backports, unpacked into the cache on first use.

The newer guest kernel (6.12, ``--kernel 6.12``) and QEMU (10.0, ``--qemu 10.0``) come
from bookworm-backports, which the machines' apt sources do not name and need not: a
private apt configuration inside the cache (its own sources file, package lists, apt
cache and an empty dpkg status) is all apt-get and apt-cache see, so the host's own apt
state is never read or written. The packages are unpacked with ``dpkg-deb -x`` into a
folder of the cache, never installed.

    CACHE/apt-backports/     bpo.sources, lists/, cache/, status: the private apt
    CACHE/<what>/VERSION     the name of the unpacked tree in use
    CACHE/<what>/<name>/     the unpacked tree (boot/, lib/modules/ or usr/bin/, ...)

A lock file in the cache makes a second process (another test run, another session)
wait, bounded, for the first one's fetch instead of downloading the same packages twice.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import AssetsMissing

SUITE = "bookworm-backports"
DEFAULT_URI = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
LOCK_WAIT_SECONDS = 900.0  # another process's whole fetch (the kernel is 106 MB)
UPDATE_SECONDS = 300.0
DOWNLOAD_SECONDS = 600.0
UNPACK_SECONDS = 300.0

Say = Callable[[str], None]


def say_stderr(text: str) -> None:
    print(f"virtio-user: {text}", file=sys.stderr, flush=True)


def debian_uri(sources: Sequence[Path] = SOURCES) -> str:
    """The Debian archive the system's own apt sources use for bookworm (one-line or
    deb822 files), so backports come from the same mirror; deb.debian.org otherwise."""
    files: list[Path] = []
    for where in sources:
        if where.is_dir():
            files += sorted(p for p in where.iterdir() if p.suffix in (".list", ".sources"))
        elif where.is_file():
            files.append(where)
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        uri = _uri_in_deb822(text) if path.suffix == ".sources" else _uri_in_list(text)
        if uri:
            return uri
    return DEFAULT_URI


def _uri_in_list(text: str) -> str | None:
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
            return words[1].rstrip("/")
    return None


def _uri_in_deb822(text: str) -> str | None:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, colon, value = line.partition(":")
            if colon and not line.startswith(("#", " ", "\t")):
                fields[key.strip().lower()] = value.strip()
        if "bookworm" in fields.get("suites", "").split() and \
                "deb" in fields.get("types", "").split() and fields.get("uris"):
            return fields["uris"].split()[0].rstrip("/")
    return None


@dataclass(frozen=True)
class PrivateApt:
    """apt-get and apt-cache pointed at the cache's own configuration only."""
    root: Path  # CACHE/apt-backports
    uri: str = DEFAULT_URI

    def options(self) -> list[str]:
        r = self.root
        return ["-o", "Dir::Etc::SourceList=/dev/null",
                "-o", f"Dir::Etc::SourceParts={r}",
                "-o", f"Dir::State::Lists={r / 'lists'}",
                "-o", f"Dir::Cache={r / 'cache'}",
                "-o", f"Dir::State::status={r / 'status'}",
                # apt drops to the _apt user to download where it can; the cache is
                # root's, so it would only warn and go on as root.
                "-o", "APT::Sandbox::User=root"]

    def sources_text(self) -> str:
        return (f"Types: deb\nURIs: {self.uri}\nSuites: {SUITE}\nComponents: main\n"
                f"Signed-By: {KEYRING}\n")

    def prepare(self) -> None:
        for d in (self.root / "lists" / "partial", self.root / "cache" / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        (self.root / "bpo.sources").write_text(self.sources_text())
        (self.root / "status").touch()

    def run(self, tool: str, args: list[str], timeout: float,
            cwd: Path | None = None) -> str:
        cmd = [tool, *self.options(), *args]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                 cwd=cwd)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AssetsMissing(f"{tool} {' '.join(args)} failed: {exc}") from exc
        if out.returncode != 0:
            raise AssetsMissing(f"{tool} {' '.join(args)} exited with status "
                                f"{out.returncode}: {out.stderr.strip()[-1000:]}")
        return out.stdout

    def update(self) -> None:
        self.prepare()
        self.run("apt-get", ["-q", "update"], UPDATE_SECONDS)

    def depends(self, package: str, prefix: str) -> str:
        """The first dependency of ``package`` that starts with ``prefix`` (the kernel
        package behind the ``linux-image-amd64`` metapackage)."""
        out = self.run("apt-cache", ["depends", package], UPDATE_SECONDS)
        return depends_on(out, prefix, package)

    def candidate(self, package: str) -> str:
        """The version ``apt-get download package`` would fetch."""
        out = self.run("apt-cache", ["policy", package], UPDATE_SECONDS)
        return candidate_in(out, package)

    def download(self, packages: Sequence[str], folder: Path) -> list[Path]:
        self.run("apt-get", ["-q", "download", *packages], DOWNLOAD_SECONDS, cwd=folder)
        debs = sorted(folder.glob("*.deb"))
        if len(debs) != len(packages):
            raise AssetsMissing(f"apt-get download {' '.join(packages)} gave "
                                f"{[d.name for d in debs]}")
        return debs


def depends_on(apt_cache_output: str, prefix: str, package: str) -> str:
    for line in apt_cache_output.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Depends" and value.strip().startswith(prefix):
            return value.strip()
    raise AssetsMissing(f"{SUITE} has no {prefix}* package behind {package}")


def candidate_in(apt_cache_policy: str, package: str) -> str:
    for line in apt_cache_policy.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate" and value.strip() not in ("", "(none)"):
            return value.strip()
    raise AssetsMissing(f"{SUITE} has no {package}")


def unpack(debs: Sequence[Path], tree: Path) -> None:
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True,
                       timeout=UNPACK_SECONDS)


class CacheLock:
    """An exclusive flock on CACHE/.backports.lock, waited for at most ``timeout``."""

    def __init__(self, cache: Path, timeout: float = LOCK_WAIT_SECONDS) -> None:
        self.path = cache / ".backports.lock"
        self.timeout = timeout
        self.fd = -1

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise AssetsMissing(
                        f"another process has held {self.path} for more than "
                        f"{self.timeout:g} s (a fetch from {SUITE}); try again") from None
                time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def installed_tree(folder: Path) -> Path | None:
    """The unpacked tree that ``folder/VERSION`` names, if it is there."""
    try:
        tree = folder / (folder / "VERSION").read_text().strip()
    except OSError:
        return None
    return tree if tree.name and tree.is_dir() else None


def fetch(folder: Path, choose: Callable[[PrivateApt], tuple[str, list[str]]],
          what: str, say: Say = say_stderr) -> Path:
    """The tree in ``folder`` (CACHE/<what>), downloading and unpacking it first if it is
    not there. ``choose(apt)`` names the tree and the packages, after ``apt-get update``;
    it may raise AssetsMissing (the suite moved on to another version, say)."""
    tree = installed_tree(folder)
    if tree is not None:
        return tree
    cache = folder.parent
    with CacheLock(cache):
        tree = installed_tree(folder)  # fetched by whoever held the lock before us
        if tree is not None:
            return tree
        apt = PrivateApt(cache / "apt-backports", debian_uri())
        start = time.monotonic()
        say(f"first use of {what}: fetching it from {SUITE} into {folder}")
        apt.update()
        name, packages = choose(apt)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
            staging = Path(tmp)
            download = staging / "debs"
            download.mkdir()
            unpacked = staging / "tree"
            unpack(apt.download(packages, download), unpacked)
            target = folder / name
            shutil.rmtree(target, ignore_errors=True)
            unpacked.rename(target)
        (folder / ".VERSION.tmp").write_text(name + "\n")
        (folder / ".VERSION.tmp").replace(folder / "VERSION")
        say(f"{what}: {', '.join(packages)} unpacked in {time.monotonic() - start:.0f} s")
        return target
