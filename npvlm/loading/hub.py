"""Model names: a local folder, "demo", or a Hugging Face Hub id ("google/paligemma-3b-mix-224").

A hub id is looked up in the local Hugging Face cache (`HF_HUB_CACHE`, or `HF_HOME`/hub, default
~/.cache/huggingface/hub: the `models--org--name/snapshots/<revision>/` layout that
`huggingface_hub` writes) and, where the network and the user's token allow, downloaded into it
with a progress bar: only the files npvlm reads (config.json, the safetensors files and their
index, tokenizer.model). The lookup and download are `huggingface_hub.snapshot_download`
(the optional `hub` extra: `pip install 'npvlm[hub]'`). A local folder of the same name wins.
"""

import os
import re
from pathlib import Path

from ..demo import MODEL_DIR as DEMO_MODEL
from ..errors import ConfigError

FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(name):
    """"org/name" as the Hub spells repository ids (no leading ./ or /, one slash)."""
    return bool(_HUB_ID.match(str(name))) and ".." not in str(name)


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir():
    """The Hugging Face hub cache, read now (not when huggingface_hub was imported):
    HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def resolve(name):
    """The folder a model name stands for: "demo" is the embedded demo model; an existing path
    is itself; a hub id is its snapshot in the Hugging Face cache (downloaded if missing and
    allowed). Anything else is returned as a Path, for the caller to report as not found."""
    if str(name) == "demo":
        return DEMO_MODEL
    path = Path(name)
    if path.exists() or not is_hub_id(name):
        return path
    try:
        # the optional `hub` extra, imported only when a hub id is used (a heavy import)
        from huggingface_hub import errors as hub_errors  # noqa: PLC0415 (optional extra)
        from huggingface_hub import snapshot_download  # noqa: PLC0415 (optional extra)
    except ImportError:
        raise ConfigError(f"{name}: no such folder, and loading it from the Hugging Face Hub needs "
                          "huggingface_hub: pip install 'npvlm[hub]'") from None
    gate = (f"if the model is gated, accept its license at https://huggingface.co/{name} and log "
            "in (`hf auth login`, or set HF_TOKEN)")
    try:
        return Path(snapshot_download(name, allow_patterns=FILES, cache_dir=cache_dir(),
                                      local_files_only=_offline()))
    except hub_errors.GatedRepoError:
        raise ConfigError(f"{name}: a gated model: {gate}") from None
    except hub_errors.RepositoryNotFoundError:
        raise ConfigError(f"{name}: no such model on the Hugging Face Hub, or it is private or "
                          f"gated and you are not logged in; {gate}") from None
    except hub_errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
        raise ConfigError(f"{name}: not in the Hugging Face cache ({cache_dir()}) and {why}; download it "
                          f"once with network access (`hf download {name}`, or run this again "
                          f"online); {gate}") from None
    except (hub_errors.HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{name}: download from the Hugging Face Hub failed ({first})") from None
