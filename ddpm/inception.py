"""Inception-v3 as the papers' FID and IS use it: torch-fidelity's "inception-v3-compat" network with its published
weights file (TensorFlow's 2015-12-05 Inception, converted), fetched once into torch's cache, checked by SHA-256
before anything reads it, and loaded as plain tensors: never unpickled, by us or by torch-fidelity.

The published file's name carries the first 8 hex digits of its SHA-256 (torch.hub's convention, and all that
torch.hub checks); INCEPTION_SHA256 is that prefix. A caller that knows the whole digest passes it instead: every
check here accepts a digest or any prefix of one at least 8 hex digits long.
"""

import hashlib
import io
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.utils import create_feature_extractor

from .checkpoint import CheckpointError, safe_load
from .files import atomic_write

INCEPTION_URL = URL_INCEPTION_V3  # torch-fidelity's release asset on GitHub
INCEPTION_WEIGHTS_FILE = INCEPTION_URL.rsplit("/", 1)[1]  # weights-inception-2015-12-05-6726825d.pth
INCEPTION_SHA256 = torch.hub.HASH_REGEX.search(INCEPTION_WEIGHTS_FILE)[1]  # 6726825d
INCEPTION_NAME = "inception-v3-compat"  # torch-fidelity's registered extractor
CONNECT_TIMEOUT_S = 10.0  # to connect, and for each read: offline, the pipeline goes on without Inception quickly
DOWNLOAD_LIMIT_S = 900.0  # the whole file (~92 MB); a server that trickles it is given up on
CHUNK = 1 << 20


class MissingWeightsError(FileNotFoundError):
    """Inception-v3 was requested but its weights are not on this machine."""


class DownloadError(OSError):
    """The weights could not be fetched whole and verified; `offline` when the server could not be reached at all.
    Nothing is left behind: a partial or refused file is removed."""

    def __init__(self, message: str, offline: bool = False):
        super().__init__(message)
        self.offline = offline


def default_inception_weights(url: str = INCEPTION_URL) -> Path:
    """Where torch-fidelity (torch.hub) keeps a downloaded weights file: $TORCH_HOME/hub/checkpoints/<its name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The local Inception-v3 weights file: `path` when given, else torch-fidelity's cache. Never downloads."""
    found = Path(path).expanduser() if path else default_inception_weights()
    if not found.is_file():
        raise MissingWeightsError(
            f"Inception-v3 weights not found at {found}: put torch-fidelity's {INCEPTION_WEIGHTS_FILE} "
            f"({INCEPTION_URL}) there{'' if path else ' or give its path'}")
    return found


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(sha256: str) -> str:
    sha256 = sha256.strip().lower()
    if len(sha256) < 8 or len(sha256) > 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"SHA-256 {sha256!r}: 8 to 64 hex digits expected")
    return sha256


def expected_digest(path: Path, sha256: str | None) -> str | None:
    """The digest `path` must have: `sha256` when given, else the published one under the published name."""
    if sha256:
        return _check_digest(sha256)
    return INCEPTION_SHA256 if path.name == INCEPTION_WEIGHTS_FILE else None


def verify_inception_weights(path: Path, sha256: str | None = None) -> None:
    """CheckpointError naming `path` unless its SHA-256 starts with `expected_digest(path, sha256)`."""
    expected = expected_digest(path, sha256)
    if expected and not (digest := sha256_of(path)).startswith(expected):
        published = " as torch-fidelity's published Inception-v3 weights do" if expected == INCEPTION_SHA256 else ""
        raise CheckpointError(f"{path}: its SHA-256 starts {digest[:8]}, not {expected[:8]}{published}; a damaged "
                              "or different file under their name")


def download_inception_weights(dest: Path, url: str = INCEPTION_URL, sha256: str = INCEPTION_SHA256, *,
                               timeout: float = CONNECT_TIMEOUT_S, limit_s: float = DOWNLOAD_LIMIT_S) -> Path:
    """Fetch `url` into `dest`, hashing as it arrives: only a whole file whose SHA-256 starts with `sha256` is
    put in place (`atomic_write`: a temporary beside it until then); anything else is removed and raised as
    DownloadError naming `url` and `dest`. `timeout` bounds the connection and each read, `limit_s` the whole
    download."""
    sha256, dest, received = _check_digest(sha256), Path(dest), [0]
    try:
        # the folder is made only once the server answers
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_write(dest) as tmp:
            digest, size, expected = _receive(response, tmp, url, limit_s, received)
            if 0 <= size < expected:
                raise DownloadError(f"{url}: truncated download ({size} of {expected} bytes); nothing was kept")
            if not digest.startswith(sha256):
                raise DownloadError(f"{dest}: refused and removed: the file from {url} has a SHA-256 starting "
                                    f"{digest[:8]}, not {sha256[:8]}")
        return dest
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:  # socket.timeout is TimeoutError
        reason = getattr(e, "reason", None) or e
        if received[0]:
            raise DownloadError(f"{url}: the download stopped after {received[0]} bytes ({reason})") from None
        raise DownloadError(f"{url}: cannot be reached ({reason}; timeout {timeout:g} s)", offline=True) from None


def _receive(response, tmp: Path, url: str, limit_s: float, received: list[int]) -> tuple[str, int, int]:
    """Write the response's body to `tmp`: (its SHA-256, its size, the size the server announced or -1);
    received[0] counts the bytes as they arrive."""
    start, digest = time.monotonic(), hashlib.sha256()
    with open(tmp, "wb") as f:
        while block := response.read(CHUNK):
            digest.update(block)
            f.write(block)
            received[0] += len(block)
            if time.monotonic() - start > limit_s:
                raise DownloadError(f"{url}: not downloaded within {limit_s:g} s ({received[0]} bytes so far)")
    return digest.hexdigest(), received[0], int(response.headers.get("Content-Length") or -1)


def load_inception_weights(path: str | Path | None = None, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The Inception-v3 state dict in the local weights file (`find_inception_weights`), checked against
    `sha256` (else, under the published name, the published digest: `verify_inception_weights`) and then read
    as plain tensors (CheckpointError for a file that holds anything else)."""
    found = find_inception_weights(path)
    verify_inception_weights(found, sha256)
    state = safe_load(found)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{found}: not Inception-v3 weights in torch-fidelity's format "
                              f"(a {type(state).__name__}, not a state dict of tensors)")
    return state


def inception_extractor(path: str | Path | None, layers: list[str],
                        sha256: str | None = None) -> torch_fidelity.FeatureExtractorBase:
    """torch-fidelity's Inception-v3 with the weights of `load_inception_weights(path, sha256)`.

    torch-fidelity builds it only by torch.load(weights_only=False) of its weights path: it is given the
    verified tensors, saved again into memory, so no pickle from the file is ever run."""
    found = find_inception_weights(path)
    buffer = io.BytesIO()
    torch.save(load_inception_weights(found, sha256), buffer)
    buffer.seek(0)
    try:
        return create_feature_extractor(INCEPTION_NAME, layers, cuda=False, verbose=False,
                                        feature_extractor_weights_path=buffer)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen tensors, one per line
        first = next((line.strip() for line in str(e).splitlines()[1:]), str(e))
        raise CheckpointError(f"{found}: not Inception-v3 weights in torch-fidelity's format "
                              f"({textwrap.shorten(first, 160, placeholder=' ...')})") from None
