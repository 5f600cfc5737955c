"""Fetching a zipped tree over HTTP from a local server on 127.0.0.1: resume, checksum, offline."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import make_tree

from imgcls.data import DataError, ImageFolderData
from imgcls.data.download import fetch_tree


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.payload, honouring `Range: bytes=N-` unless server.ranges is False."""

    def do_GET(self):
        payload = self.server.payload
        self.server.requests.append(self.headers.get("Range"))
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and self.server.ranges else 0
        if start >= len(payload) and start:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        body = payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: self.server.cut])  # cut: the connection drops after that many bytes

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path: Path):
    tree = make_tree(tmp_path / "src" / "mini_data", counts={"train": 2, "val": 2})
    archive = tmp_path / "mini_data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*")):
            zf.write(path, path.relative_to(tree.parent).as_posix())
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.payload = archive.read_bytes()
    httpd.requests = []
    httpd.ranges = True
    httpd.cut = None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/mini_data.zip"
    httpd.sha256 = hashlib.sha256(httpd.payload).hexdigest()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_missing_root_is_downloaded_verified_and_unpacked(tmp_path: Path, server):
    root = tmp_path / "data" / "mini_data"
    d = ImageFolderData(
        str(root), {"train": "train", "val": "val"}, batch_size=2,
        download={"url": server.url, "sha256": server.sha256, "archive_folder": "mini_data"},
    )  # fmt: skip
    assert d.scan().report.counts["train"] == {"cat": 2, "dog": 2, "fox": 2}
    assert sorted(p.name for p in root.parent.iterdir()) == ["mini_data"]  # no zip or temp left
    d.scan()  # present now: no second download
    assert server.requests == [None]


def test_partial_download_resumes_with_a_range_request(tmp_path: Path, server):
    root = tmp_path / "mini_data"
    part = tmp_path / "mini_data.zip.part"
    part.write_bytes(server.payload[:1000])
    fetch_tree(root, server.url, server.sha256, "mini_data")
    assert server.requests == ["bytes=1000-"]
    assert (root / "train" / "cat" / "cat_000.jpg").is_file() and not part.exists()


def test_an_interrupted_download_resumes_on_the_next_run(tmp_path: Path, server):
    server.cut = 1500
    root = tmp_path / "mini_data"
    with pytest.raises(
        DataError, match="The 1,500 bytes fetched so far in .*mini_data.zip.part resume on the next run"
    ):
        fetch_tree(root, server.url, server.sha256, "mini_data")
    server.cut = None
    fetch_tree(root, server.url, server.sha256, "mini_data")
    assert server.requests == [None, "bytes=1500-"]
    assert (root / "train" / "cat" / "cat_000.jpg").is_file()


def test_a_server_without_range_support_restarts_from_zero(tmp_path: Path, server):
    server.ranges = False
    (tmp_path / "mini_data.zip.part").write_bytes(b"stale bytes from another file")
    fetch_tree(tmp_path / "mini_data", server.url, server.sha256, "mini_data")
    assert (tmp_path / "mini_data" / "val" / "fox").is_dir()


def test_a_checksum_mismatch_deletes_the_download(tmp_path: Path, server):
    with pytest.raises(DataError, match=f"sha256 {server.sha256} does not match data.download.sha256=0000"):
        fetch_tree(tmp_path / "dl" / "mini_data", server.url, "0000", "mini_data")
    assert list((tmp_path / "dl").iterdir()) == []  # no .part left to resume a wrong file from


def test_a_wrong_archive_folder_is_named(tmp_path: Path, server):
    with pytest.raises(DataError, match=r"holds mini_data, not the folder 'nope'"):
        fetch_tree(tmp_path / "x", server.url, None, "nope")


def test_offline_says_how_to_get_the_data(tmp_path: Path):
    with socket.socket() as s:  # a port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hymenoptera_data.zip"
    root = tmp_path / "data" / "hymenoptera_data"
    with pytest.raises(DataError) as info:
        fetch_tree(root, url, None, "hymenoptera_data")
    message = str(info.value)
    assert f"data.root='{root}' does not exist and downloading {url} failed" in message
    assert f"download {url}, unzip it, and put its hymenoptera_data folder at {root}" in message


def test_a_cut_connection_is_an_error_without_a_checksum_too(tmp_path: Path, server):
    """torch.hub.download_url_to_file keeps a cut body as the whole file when no hash is given
    (the reason imgcls.data.download checks Content-Length itself)."""
    server.cut = 700
    with pytest.raises(
        DataError, match=r"connection closed after 700 of [\d,]+ bytes.*700 bytes fetched so far"
    ):
        fetch_tree(tmp_path / "mini_data", server.url, None, "mini_data")
    assert not (tmp_path / "mini_data").exists()
