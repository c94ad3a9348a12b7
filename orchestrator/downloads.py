"""Downloads on the submitting machine: the weights cache folder (``$ORCH_WEIGHTS_DIR``, else
torch's hub cache), an internal mirror (``$ORCH_WEIGHTS_MIRROR``), and a hash-checked, atomic
download with a progress bar. Jobs never download: they read the folder ``orch submit`` hands them
in ``model.weights_dir`` (:func:`detection.weights.cached_file`)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from cluster.errors import LaunchError
from cluster.files import atomic_write
from detection.weights import TORCHVISION_URL, WeightsFile, default_cache_dir

DOWNLOAD_TIMEOUT_S = 30.0  # per connect / read: an offline node that drops packets fails in 30 s


def cache_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """The weights cache: ``$ORCH_WEIGHTS_DIR``, else ``torch.hub.get_dir()/checkpoints``
    (``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``)."""
    env = os.environ if environ is None else environ
    if env.get("ORCH_WEIGHTS_DIR"):
        return Path(os.path.abspath(os.path.expanduser(env["ORCH_WEIGHTS_DIR"])))
    return default_cache_dir(env)


def download_url(entry: WeightsFile, environ: Optional[Mapping[str, str]] = None) -> str:
    """The URL to download ``entry`` from: ``$ORCH_WEIGHTS_MIRROR`` replaces torchvision's
    ``https://download.pytorch.org/models`` prefix (a cluster's internal mirror)."""
    env = os.environ if environ is None else environ
    mirror = (env.get("ORCH_WEIGHTS_MIRROR") or "").rstrip("/")
    if mirror and entry.url.startswith(TORCHVISION_URL + "/"):
        return mirror + entry.url[len(TORCHVISION_URL):]
    return entry.url


@dataclass(frozen=True)
class Fetched:
    """Where :func:`fetch` put a file, its size, and whether it was already there."""

    entry: WeightsFile
    path: Path
    size: int
    cached: bool


def fetch(entry: WeightsFile, environ: Optional[Mapping[str, str]] = None,
          progress: Optional[bool] = None) -> Fetched:
    """Make sure ``entry`` is in the cache: download it once (``$ORCH_WEIGHTS_MIRROR`` honoured),
    check its sha256 prefix, and move it in atomically; a file already there is left alone.
    ``progress`` (default: stderr is a terminal) shows a tqdm bar. Failures are one-line
    :class:`LaunchError` s, and no partial file is left in the cache."""
    folder = cache_dir(environ)
    path = folder / entry.file_name
    if path.is_file():
        return Fetched(entry, path, path.stat().st_size, cached=True)
    url = download_url(entry, environ)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LaunchError(f"cannot create the weights cache {folder} ({err.strerror}); point ORCH_WEIGHTS_DIR "
                          "at a writable folder") from None
    _download(url, path, entry.hash_prefix, sys.stderr.isatty() if progress is None else progress)
    return Fetched(entry, path, path.stat().st_size, cached=False)


def _download(url: str, path: Path, hash_prefix: Optional[str], progress: bool) -> None:
    import http.client
    import urllib.error

    hint = (f"connect this machine, set ORCH_WEIGHTS_MIRROR to a mirror of {TORCHVISION_URL}, or copy "
            f"{path.name} into {path.parent} (the weights cache)")
    try:
        # A temporary file in the cache folder itself, renamed in only once its hash is checked.
        with atomic_write(path) as handle:
            try:
                digest = _copy_url(url, handle, progress, path.name)
            except urllib.error.HTTPError as err:
                raise LaunchError(f"cannot download {url}: HTTP {err.code} {err.reason}; {hint}") from None
            except urllib.error.URLError as err:
                raise LaunchError(f"cannot download {url} ({_reason(err.reason)}); {hint}") from None
            except (OSError, http.client.HTTPException) as err:  # timeouts, resets, cut transfers, a full disk
                raise LaunchError(f"cannot download {url} ({_reason(err)}); {hint}") from None
            if hash_prefix and not digest.startswith(hash_prefix):
                raise LaunchError(f"{url}: sha256 {digest[:len(hash_prefix)]}... does not match the {hash_prefix} "
                                  f"in its name (a corrupt download, or a wrong mirror); nothing was kept in "
                                  f"{path.parent}")
    except OSError as err:  # the temporary file could not be made or renamed
        raise LaunchError(f"cannot write to the weights cache {path.parent} ({err.strerror}); point "
                          "ORCH_WEIGHTS_DIR at a writable folder") from None


def _copy_url(url: str, out, progress: bool, label: str) -> str:
    """Stream ``url`` into ``out``; return the sha256 hex digest of what was written."""
    import hashlib
    import urllib.request

    sha = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "orch"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = response.headers.get("Content-Length")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=label, file=sys.stderr)
        written = 0
        try:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                sha.update(chunk)
                written += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    if total and written < int(total):  # a cut transfer is a network problem, not a bad file
        raise ConnectionError(f"the connection closed after {written} of {total} bytes")
    return sha.hexdigest()


def _reason(reason: object) -> str:
    """A socket error as a short phrase (``[Errno 111] Connection refused`` -> ``Connection refused``)."""
    text = getattr(reason, "strerror", None) or str(reason)
    return " ".join(str(text).split()) or type(reason).__name__
