"""torchvision's ImageNet weights for the CNN branch: where they are cached, fetching, checking.

Why here, at the bottom: ``models/cnn.py`` fetches on ``model.pretrained: auto|required`` and
``cmdb weights`` fetches on request; both need the same file names, URLs and checks, and
neither may pull in a workflow package.

Files go where torchvision puts them (``$TORCH_HOME/hub/checkpoints``, see
``torch.hub.get_dir``), under torchvision's names, so a cache filled here is the cache every
peer reads and vice versa. Those names end with the first hex digits of the file's sha256
(``resnet34-b627a593.pth``); a download whose digest does not start with them is deleted and
reported. Downloads are written under a temporary name and renamed when checked.

Timeouts: every socket operation (connect, each read) gives up after ``timeout`` seconds, so
an offline cluster node fails in seconds instead of hanging; a slow but live link still
finishes. ``CMDB_WEIGHTS_URL`` replaces the base URL (a mirror, or a test's local server).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cmdbnet.errors import CmdbError
from cmdbnet.utils import atomic_path, file_sha256

BASE_URL = "https://download.pytorch.org/models/"
URL_ENV = "CMDB_WEIGHTS_URL"
AUTO_TIMEOUT_S = 5.0  # model.pretrained=auto: short, an offline node must not hang
FETCH_TIMEOUT_S = 30.0  # cmdb weights fetch: asked for, so more patient
# torchvision's IMAGENET1K_V1 files (ResNet*_Weights.IMAGENET1K_V1.url), the recipe every peer used
FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth",
         "resnet50": "resnet50-0676ba61.pth"}


class WeightsUnavailable(CmdbError):
    """The weights could not be fetched (offline, timeout, HTTP error, bad checksum)."""


def _check_name(name: str) -> str:
    if name not in FILES:
        raise CmdbError(f"unknown backbone {name!r}; ImageNet weights exist for {', '.join(FILES)}")
    return name


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_file(name: str) -> Path:
    """Where torchvision caches the ImageNet weights of ``name`` (it may not exist)."""
    return cache_dir() / FILES[_check_name(name)]


def weights_url(name: str) -> str:
    base = os.environ.get(URL_ENV) or BASE_URL
    if urllib.parse.urlsplit(base).scheme.lower() not in ("http", "https", "file", "ftp"):
        raise CmdbError(f"{URL_ENV}={base!r} is not a URL (no http://, https:// or file:// in front); write it "
                        f"like http://mirror.local/models/")
    return base.rstrip("/") + "/" + FILES[_check_name(name)]


def cache_state(name: str) -> str:
    """``"ok"`` (cached, sha256 matching its name), ``"corrupt"`` (cached, not matching) or ``"missing"``."""
    path = cached_file(name)
    if not path.is_file():
        return "missing"
    want = hash_prefix(path.name)
    return "ok" if not want or file_sha256(path).startswith(want) else "corrupt"


def hash_prefix(filename: str) -> str | None:
    """The sha256 prefix in a torchvision weights file name (``resnet34-b627a593.pth``)."""
    m = re.search(r"-([0-9a-f]{8,64})\.", filename)
    return m.group(1) if m else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "no answer in time"
    inner = getattr(exc, "reason", None)
    if isinstance(inner, (TimeoutError, socket.timeout)):
        return "no answer in time"
    return str(inner or exc) or type(exc).__name__


def fetch(name: str, timeout: float = FETCH_TIMEOUT_S, force: bool = False,
          progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download the ImageNet weights of ``name`` into the cache (checked); returns the file.

    ``progress(bytes_so_far, total_or_None)`` is called after each chunk. A cached file whose
    sha256 does not match its name is downloaded again.
    """
    dst = cached_file(name)
    if not force and cache_state(name) == "ok":
        return dst
    url, want = weights_url(name), hash_prefix(dst.name)
    digest = hashlib.sha256()
    with atomic_path(dst) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:  # noqa: S310
                total = int(resp.headers.get("Content-Length") or 0) or None
                done = 0
                while block := resp.read(2**20):
                    digest.update(block)
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
        except (urllib.error.URLError, OSError) as exc:
            raise WeightsUnavailable(f"cannot download {url} ({_reason(exc)}, timeout {timeout:g} s)") from None
        got = digest.hexdigest()
        if want and not got.startswith(want):
            raise WeightsUnavailable(f"{url}: the download's sha256 starts {got[:len(want)]}, not {want} as its "
                                     f"name says (corrupt or wrong file); deleted, nothing cached")
    return dst


@dataclass(frozen=True)
class CachedWeights:
    name: str
    path: Path
    size: int
    sha256: str
    ok: bool  # the digest starts with the prefix in the name


def list_cached() -> list[CachedWeights]:
    """Every ``*.pth`` in the cache, known backbones first, with its checksum checked."""
    folder = cache_dir()
    files = sorted(folder.glob("*.pth")) if folder.is_dir() else []
    known = {v: k for k, v in FILES.items()}
    files.sort(key=lambda p: (p.name not in known, p.name))
    out = []
    for p in files:
        digest, want = file_sha256(p), hash_prefix(p.name)
        out.append(CachedWeights(known.get(p.name, p.stem), p, p.stat().st_size, digest,
                                 bool(want) and digest.startswith(want)))
    return out
