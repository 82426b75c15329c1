"""Where the stages get Inception-v3's weights: evaluate.inception_weights (a file of yours), else torch's cache
($TORCH_HOME/hub/checkpoints/), downloaded there on first use and checked by SHA-256 before anything reads it.

Two environment variables point the download elsewhere (a mirror, an air-gapped server):
DDPM_INCEPTION_URL (default torch-fidelity's release asset) and DDPM_INCEPTION_SHA256 (its digest, or a prefix of
8 or more hex digits; default the published file's, 6726825d). The file is kept under the URL's last path part.

Without it (offline, or a download refused), the stages go on with the domain classifier alone and say why, in
one line and in the headline; with evaluate.inception_required they stop before any work instead.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ddpm import CheckpointError
from ddpm.inception import (
    INCEPTION_SHA256,
    INCEPTION_URL,
    DownloadError,
    MissingWeightsError,
    default_inception_weights,
    download_inception_weights,
    find_inception_weights,
    load_inception_weights,
)

from .params import ParamsError

URL_VARIABLE, SHA256_VARIABLE = "DDPM_INCEPTION_URL", "DDPM_INCEPTION_SHA256"


@dataclass(frozen=True)
class InceptionWeights:
    """The weights file to build Inception-v3 from and its digest, or None and why not ("off", "offline", ...)."""
    path: Path | None
    sha256: str | None
    why_not: str | None = None

    def status(self) -> str:
        """For the headline: "available", "off" or "unavailable (<why>)"."""
        return "available" if self.path else self.why_not if self.why_not == "off" else f"unavailable ({self.why_not})"


def source() -> tuple[str, str]:
    """(URL, SHA-256) of the weights to download: the environment's, else torch-fidelity's published file."""
    sha256 = os.environ.get(SHA256_VARIABLE) or INCEPTION_SHA256
    if not re.fullmatch(r"[0-9a-fA-F]{8,64}", sha256):
        raise ParamsError(f"{SHA256_VARIABLE}={sha256!r}: a SHA-256 digest or its first 8 or more hex digits expected")
    return os.environ.get(URL_VARIABLE) or INCEPTION_URL, sha256


def inception_weights(p) -> InceptionWeights:
    """The checked Inception-v3 weights when evaluate.extractors lists inception, fetched if need be.

    A file named by evaluate.inception_weights that is missing or bad stops the stage (one line); a download
    that fails does too under evaluate.inception_required, else the stage prints why and goes on without."""
    if "inception" not in p.evaluate.extractors:
        return InceptionWeights(None, None, "off")
    if p.evaluate.inception_weights:
        try:
            path = find_inception_weights(p.evaluate.inception_weights)
            load_inception_weights(path)  # read as plain tensors: a file never runs code
        except (MissingWeightsError, CheckpointError) as e:
            raise type(e)(f"{e} (params.yaml: evaluate.inception_weights)") from None
        return InceptionWeights(path, None)
    url, sha256 = source()
    try:
        return InceptionWeights(fetch(url, sha256), sha256)
    except DownloadError as e:
        if p.evaluate.inception_required:
            raise MissingWeightsError(f"Inception-v3 weights unavailable: {e} (params.yaml: evaluate.inception_required"
                                      " is true; with false the run goes on with the domain classifier)") from None
        why = "offline" if e.offline else "download failed"
        print(f"inception: unavailable ({why}): {e}; scoring with the domain classifier alone (run `dvc repro -f "
              "reference` once it can be downloaded)")
        return InceptionWeights(None, None, why)


def fetch(url: str, sha256: str) -> Path:
    """The cached weights file for `url`, downloaded first when absent; a cached file whose digest is wrong is
    removed and downloaded again."""
    cached = default_inception_weights(url)
    if cached.is_file():
        try:
            load_inception_weights(cached, sha256)
            return cached
        except CheckpointError as e:
            cached.unlink()
            print(f"{e}: removed, downloading it again")
    download_inception_weights(cached, url, sha256)
    load_inception_weights(cached, sha256)  # plain tensors, or a one-line CheckpointError naming the file
    print(f"inception: downloaded {url} to {cached} ({cached.stat().st_size / 1e6:.0f} MB, SHA-256 checked)")
    return cached
