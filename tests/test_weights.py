"""The download cache, without network: a server on 127.0.0.1 plays the model host."""

from __future__ import annotations

import hashlib
import http.server
import threading
import urllib.error
from pathlib import Path

import pytest
import torch

from itaclip_core.model import weights
from itaclip_core.model.random import random_clip_state_dict
from itaclip_core.model.weights import ChecksumError, RegistryEntry, WeightsUnavailableError


class _Server:
    """Serves one file body, counting requests; the body can be swapped to simulate corruption."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.requests += 1
                body = server.bodies[min(server.requests, len(server.bodies)) - 1]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/tiny.pt"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({k: v.half() for k, v in random_clip_state_dict("tiny", seed=5).items()}, path)
    return path.read_bytes()


@pytest.fixture
def server(monkeypatch, checkpoint_bytes):
    server = _Server()
    entry = RegistryEntry(server.url, hashlib.sha256(checkpoint_bytes).hexdigest(), "tiny-test.pt")
    monkeypatch.setitem(weights.REGISTRY, "Tiny/Test", entry)
    yield server
    server.close()


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_verifies_and_caches(server, checkpoint_bytes, tmp_path):
    server.bodies = [checkpoint_bytes]
    path = weights.download_checkpoint("Tiny/Test", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == checkpoint_bytes
    assert server.requests == 1
    again = weights.download_checkpoint("Tiny/Test", cache_dir=tmp_path, progress=False)
    assert again == path and server.requests == 1  # the verified file is reused
    model = weights.load_clip("Tiny/Test", device="cpu", cache_dir=tmp_path, progress=False)
    assert model.weights_id == f"Tiny/Test sha256:{hashlib.sha256(checkpoint_bytes).hexdigest()}"


def test_corrupt_cached_file_is_replaced(server, checkpoint_bytes, tmp_path):
    server.bodies = [checkpoint_bytes]
    (tmp_path / "tiny-test.pt").write_bytes(b"garbage")
    path = weights.download_checkpoint("Tiny/Test", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == checkpoint_bytes and server.requests == 1


def test_one_corrupt_download_is_retried(server, checkpoint_bytes, tmp_path):
    server.bodies = [checkpoint_bytes[:-10] + b"0123456789", checkpoint_bytes]
    path = weights.download_checkpoint("Tiny/Test", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == checkpoint_bytes and server.requests == 2
    assert _cache_files(tmp_path) == ["tiny-test.pt", "tiny-test.pt.verified.json"]


def test_two_corrupt_downloads_raise_and_leave_nothing(server, checkpoint_bytes, tmp_path):
    server.bodies = [b"corrupt" * 100]
    with pytest.raises(ChecksumError, match="did not have sha256"):
        weights.download_checkpoint("Tiny/Test", cache_dir=tmp_path, progress=False)
    assert server.requests == 2
    assert _cache_files(tmp_path) == []


def test_offline_error_says_which_file_and_where(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(weights, "urlopen", offline)
    with pytest.raises(WeightsUnavailableError) as error:
        weights.load_clip("ViT-B/16", cache_dir=tmp_path, progress=False)
    message = str(error.value)
    assert "ViT-B-16.pt" in message and str(tmp_path / "ViT-B-16.pt") in message
    assert "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f" in message
    assert _cache_files(tmp_path) == []


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ITACLIP_CACHE", str(tmp_path / "elsewhere"))
    assert weights.default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("ITACLIP_CACHE")
    assert weights.default_cache_dir() == Path.home() / ".cache" / "itaclip"


def test_name_spellings():
    assert weights.canonical_name("ViT-B-16") == "ViT-B/16"
    assert weights.canonical_name("ViT-L-14-336px.pt") == "ViT-L/14@336px"
    assert weights.canonical_name("ViT-H/14") is None
