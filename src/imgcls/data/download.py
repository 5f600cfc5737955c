"""Fetch a zipped data tree: resumable (HTTP Range), checksum-verified when a sha256 is given.

torch.hub.download_url_to_file fetches model weights (torchvision and timm call it); a data set
archive needs what it lacks. Against tests/test_download.py's server, a connection cut after 1,500
of 5,000 bytes: torch.hub returned without an error and kept the 1,500 bytes as the whole file (no
hash given), or, with a hash, raised and deleted them; it sends no Range header and waits without
a timeout. So what stays here, each for a reason a user meets:
- the part file <root>.zip.part, appended to with `Range: bytes=N-`: a 5 GB data set cut at 4.9 GB
  resumes at 4.9 GB on the next run instead of starting again;
- the body checked against Content-Length: a cut connection is an error, never a short archive;
- the sha256 of the whole file, resumed bytes included (torch.hub hashes only what one call read);
- the unpack into root whole or not at all, with zipfile's member-name sanitising.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from loguru import logger

from imgcls.errors import DataError
from imgcls.files import writing_into
from imgcls.log import progress

MIB = 1 << 20  # read and shown in MiB: one progress step per read


def fetch_tree(root: Path, url: str, sha256: str | None = None, archive_folder: str | None = None) -> None:
    """Download url (a zip) next to root, verify it, unpack it, and move its archive_folder to root.

    An interrupted download leaves <root>.zip.part, which the next call resumes."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    part = root.with_name(root.name + ".zip.part")
    try:
        download(url, part)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        resume = (
            f" The {part.stat().st_size:,} bytes fetched so far in {part} resume on the next run."
            if part.exists()
            else ""
        )
        raise DataError(
            f"data.root={str(root)!r} does not exist and downloading {url} failed ({reason}). "
            f"On a machine with internet, download {url}, unzip it, and put its "
            f"{archive_folder or 'top'} folder at {root.resolve()} (or point data.root at it).{resume}"
        ) from exc
    if sha256:
        with open(part, "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if actual != sha256.lower():
            part.unlink()  # a wrong file would resume into a wrong file forever: start over next time
            raise DataError(
                f"{url}: sha256 {actual} does not match data.download.sha256={sha256}; the download "
                "was deleted. Retry, or check the expected checksum."
            )
    else:
        logger.warning(f"{url}: no data.download.sha256 set, the archive is not verified")
    unpack(part, root, archive_folder)
    part.unlink()


def download(url: str, part: Path, timeout: float = 30) -> None:
    """Append to part from where it ends (HTTP Range); restart from zero if the server ignores it."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the part is complete
            return
        raise
    with response:
        resumed = have > 0 and response.status == 206
        if have and not resumed:
            logger.info(f"{url}: the server does not resume downloads; starting over")
            have = 0
        elif resumed:
            logger.info(f"{url}: resuming after {have:,} bytes")
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        steps = -(-int(length) // MIB) if length is not None else None  # ceil: the last read is short
        every = max(1, steps // 10) if steps else 0  # off a terminal, a log line every 10%
        name = f"download {Path(url).name} (MiB)"
        with open(part, "ab" if resumed else "wb") as f, progress(name, steps, every) as advance:
            while chunk := response.read(MIB):
                f.write(chunk)
                advance()
    if total is not None and part.stat().st_size != total:
        raise OSError(f"connection closed after {part.stat().st_size:,} of {total:,} bytes")


def unpack(archive: Path, root: Path, archive_folder: str | None) -> None:
    """Extract into a temp folder beside root, then rename: root appears whole or not at all."""
    tmp = root.with_name(f".{root.name}.unpack-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # a full or read-only disk: WriteError naming root; whatever stops it, no half tree is left
        with writing_into(root, hint="or give data.root=<another folder>"), zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
    except zipfile.BadZipFile as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink()
        raise DataError(
            f"{archive} is not a zip file ({exc}); deleted it, the next run downloads again"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    source = tmp / archive_folder if archive_folder else tmp
    if not source.is_dir():
        found = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"{archive} holds {found}, not the folder {archive_folder!r} (data.download.archive_folder)"
        )
    os.rename(source, root)
    shutil.rmtree(tmp, ignore_errors=True)
