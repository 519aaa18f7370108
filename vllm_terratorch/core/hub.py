"""Resolve a model reference (local folder or Hugging Face repo id) to a local folder.

Repo ids go through `huggingface_hub`, so its cache, `revision` and `HF_HUB_OFFLINE=1` behave as
users expect: a warm cache serves offline, a cold one gives a message saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from vllm_terratorch.errors import ModelSourceError

# Only what a servable folder needs: never README images, example scenes or notebooks.
SNAPSHOT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "*.ckpt", "*.pt", "*.pth", "*.bin"]


def _looks_like_path(reference: str) -> bool:
    return reference.startswith(("/", "./", "../", "~")) or os.sep + os.sep in reference or reference.count("/") > 1


def resolve_model_dir(
    reference: str | os.PathLike[str],
    revision: str | None = None,
    cache_dir: str | None = None,
) -> Path:
    """Return a local folder holding `config.json` and the weights of `reference`."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    text = str(reference)
    if path.exists():
        raise ModelSourceError(f"{text} is a file; pass the model folder that holds config.json and the weights")
    if _looks_like_path(text):
        raise ModelSourceError(f"model folder {text} does not exist")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=SNAPSHOT_PATTERNS)
        )
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"{text} is neither a local folder nor in the Hugging Face cache"
            + (f" (revision {revision})" if revision else "")
            + ", and the Hub cannot be reached (HF_HUB_OFFLINE is set or there is no network). "
            "Download it once with network access, or pass a local folder."
        ) from None
    except HfHubHTTPError as error:
        raise ModelSourceError(f"cannot fetch {text} from the Hugging Face Hub: {error}") from None
