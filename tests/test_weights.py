"""ImageNet weights fetched on request: against a real HTTP server on 127.0.0.1 started here.

The server serves a real torchvision resnet18 state dict written by the test. Its file name
carries the first 8 hex digits of its sha256, as torchvision's names do, so the same check
that guards real downloads runs here.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from cmdbnet import weights
from cmdbnet.cli import app
from cmdbnet.errors import CmdbError
from cmdbnet.models.cnn import ResNetEncoder


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        self.files, self.delay, self.requests = files, 0.0, []
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request, client_address):  # a client that gave up: not the test's business
        pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/models/"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        srv = self.server
        srv.requests.append(self.path)
        time.sleep(srv.delay)
        body = srv.files.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def resnet18_file() -> tuple[str, bytes, dict]:
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    return f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth", data, state


@pytest.fixture()
def server(resnet18_file, monkeypatch, tmp_path):
    """A live server holding the resnet18 file; the hub cache and base URL point at tmp_path and it."""
    name, data, _ = resnet18_file
    srv = _Server({name: data})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setitem(weights.FILES, "resnet18", name)
    monkeypatch.setenv(weights.URL_ENV, srv.url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    yield srv
    srv.shutdown()
    srv.server_close()


def cache_listing() -> list[str]:
    folder = weights.cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_file_names_are_torchvisions_and_carry_a_sha256_prefix():
    for name, enum in (("resnet18", "ResNet18_Weights"), ("resnet34", "ResNet34_Weights"),
                       ("resnet50", "ResNet50_Weights")):
        url = getattr(torchvision.models, enum).IMAGENET1K_V1.url
        assert url == weights.BASE_URL + weights.FILES[name]
        assert len(weights.hash_prefix(weights.FILES[name])) == 8


def test_auto_downloads_into_the_hub_cache_and_loads_strictly(server, resnet18_file):
    name, data, state = resnet18_file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random init" warning
        enc = ResNetEncoder("resnet18", 3, "auto")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    assert enc.weights_source == str(cached) and cached.read_bytes() == data
    torch.testing.assert_close(enc.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert server.requests == [f"/models/{name}"] and cache_listing() == [name]
    ResNetEncoder("resnet18", 3, "required")
    assert len(server.requests) == 1  # cached: not fetched again
    res = CliRunner().invoke(app, ["weights", "list", "--json"])
    listed = json.loads(res.stdout)["files"]
    assert res.exit_code == 0 and listed[0]["name"] == "resnet18" and listed[0]["checksum_ok"] is True
    assert listed[0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_off_never_looks(server):
    enc = ResNetEncoder("resnet18", 3, "off")
    assert enc.weights_source == "random" and server.requests == [] and cache_listing() == []


def test_a_slow_server_times_out_in_seconds(server, monkeypatch, resnet18_file):
    server.delay = 3.0
    monkeypatch.setattr(weights, "AUTO_TIMEOUT_S", 0.5)
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match=r"not downloaded \(cannot download .*no answer in time.*random init"):
        enc = ResNetEncoder("resnet18", 3, "auto")
    assert time.perf_counter() - t0 < 2.5 and enc.weights_source == "random"
    cached = weights.cached_file("resnet18")
    with pytest.raises(CmdbError) as err:
        ResNetEncoder("resnet18", 3, "required")
    msg = str(err.value)
    assert f"({cached} missing)" in msg and f"download {server.url}{resnet18_file[0]} into" in msg
    assert "no answer in time" in msg and cache_listing() == []  # no temporary file left


def test_a_corrupt_download_is_deleted_with_a_clear_error(server, resnet18_file):
    name, data, _ = resnet18_file
    server.files[name] = data[:-100] + b"\x00" * 100
    res = CliRunner().invoke(app, ["weights", "fetch", "resnet18"])
    err = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(err) == 1 and "Traceback" not in res.output
    assert err[0].startswith("cmdb: error: ") and f"not {name[9:17]} as its name says" in err[0]
    assert "deleted, nothing cached" in err[0] and cache_listing() == []
    server.files[name] = data
    res = CliRunner().invoke(app, ["weights", "fetch", "resnet18"])
    assert res.exit_code == 0 and "sha256 checked" in res.stdout and cache_listing() == [name]
    # a file damaged later is reported by list
    cached = weights.cached_file("resnet18")
    cached.write_bytes(b"x" + cached.read_bytes()[1:])
    res = CliRunner().invoke(app, ["weights", "list"])
    assert res.exit_code == 0 and "MISMATCH" in res.stdout


def test_unknown_backbone_and_missing_file(server):
    res = CliRunner().invoke(app, ["weights", "fetch", "resnet101"])
    assert res.exit_code == 2 and "unknown backbone 'resnet101'" in res.stderr
    res = CliRunner().invoke(app, ["weights", "fetch", "resnet34", "--timeout", "2"])
    assert res.exit_code == 2 and "HTTP 404" in res.stderr and cache_listing() == []


def test_fetch_checks_a_cached_files_sha256_and_downloads_a_corrupt_one_again(server, resnet18_file):
    name, data, _ = resnet18_file
    cached = weights.cached_file("resnet18")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data[: len(data) // 2])  # a download cut short by another tool
    res = CliRunner().invoke(app, ["weights", "fetch", "resnet18"])
    assert res.exit_code == 0 and "sha256 did not match its name: downloaded again" in res.stdout
    assert cached.read_bytes() == data and server.requests == [f"/models/{name}"]
    res = CliRunner().invoke(app, ["weights", "fetch", "resnet18"])
    assert res.exit_code == 0 and "already cached, sha256 checked" in res.stdout and len(server.requests) == 1


@pytest.mark.parametrize("command", [["weights", "fetch", "resnet18"], "auto"])
def test_a_weights_url_without_a_scheme_is_one_clear_error(server, monkeypatch, command):
    monkeypatch.setenv(weights.URL_ENV, "127.0.0.1:9/models/")
    if command == "auto":
        with pytest.raises(CmdbError, match=r"CMDB_WEIGHTS_URL='127.0.0.1:9/models/' is not a URL"):
            ResNetEncoder("resnet18", 3, "auto")
        return
    res = CliRunner().invoke(app, command)
    assert res.exit_code == 2 and res.stderr.splitlines() == [
        "cmdb: error: CMDB_WEIGHTS_URL='127.0.0.1:9/models/' is not a URL (no http://, https:// or file:// in "
        "front); write it like http://mirror.local/models/"]
