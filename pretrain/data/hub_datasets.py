"""`--dataset_name`: a Hub dataset id, a local dataset folder or a `save_to_disk` folder, resolved to its data files
(Parquet, JSON Lines, ...) with `datasets` and `huggingface_hub`, so that they go through the streamed build like
--train_files: parallel, crash-resumable, byte-identical, bounded in memory.

Remote files are fetched as they are into the Hub's own file cache (only the chosen config's split), never
converted into the `datasets` Arrow cache; their cache paths hold the commit, so the data cache's key (the files'
paths, sizes and times) names the dataset's revision. It owns that resolution; it must not tokenize.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from pretrain.base.errors import DataError, first_line

REACH_TIMEOUT_S = 3.0


def dataset_files(name: str, config: str | None, split: str, revision: str | None) -> list[Path]:
    """The data files of one split of a dataset, local paths (downloaded first where remote)."""
    local = Path(name).expanduser()
    if (local / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one folder per split
        if not (local / split / "state.json").is_file():
            splits = json.loads((local / "dataset_dict.json").read_text()).get("splits", [])
            raise DataError(f"--dataset_name {name}: no split '{split}' (it has {', '.join(splits)}); pass "
                             f"--dataset_split")
        local = local / split
    if (local / "state.json").is_file():  # Dataset.save_to_disk: its Arrow files, in order
        return [local / entry["filename"] for entry in json.loads((local / "state.json").read_text())["_data_files"]]
    if not local.exists():
        ensure_hub_reachable(name)
    import datasets

    try:
        builder = datasets.load_dataset_builder(name, config, revision=revision)
    except Exception as error:  # no such dataset or config, a script dataset, an unreadable card
        raise DataError(f"--dataset_name {name}: {first_line(error)}; check the name, --dataset_config_name and "
                         f"--dataset_revision") from None
    data_files = builder.config.data_files or {}
    if split not in data_files:
        found = ", ".join(data_files) or "none: it is not made of data files, so it cannot be streamed"
        raise DataError(f"--dataset_name {name}: no data files for split '{split}' (splits with files: {found}); "
                         f"pass --dataset_split, or download the files and use --train_files")
    return [fetch(str(file), name) for file in data_files[split]]


def fetch(file: str, name: str) -> Path:
    """A data file as a local path: hf:// files through the Hub's file cache, local paths as they are."""
    if not file.startswith("hf://"):
        if "://" in file:
            raise DataError(f"--dataset_name {name}: {file} is not on the Hub nor on this machine; download it and "
                             f"use --train_files")
        return Path(file)
    from huggingface_hub import hf_hub_download

    # hf://datasets/ORG/NAME@REVISION/path/in/repo
    repo_and_revision, _, filename = file.removeprefix("hf://datasets/").partition("/")
    owner_name, _, path = filename.partition("/")
    repo, _, revision = f"{repo_and_revision}/{owner_name}".partition("@")
    try:
        return Path(hf_hub_download(repo, path, repo_type="dataset", revision=revision or None))
    except Exception as error:
        raise DataError(f"--dataset_name {name}: downloading {path} failed ({first_line(error)}); check the "
                         f"network, or download the files and use --train_files") from None


def ensure_hub_reachable(name: str) -> None:
    """One line within seconds, instead of a minute of retries, when a Hub id cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise DataError(f"--dataset_name {name}: cannot reach the Hub (HF_HUB_OFFLINE is set) and there is no such "
                         f"folder here; pass a local folder or --train_files")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        raise DataError(f"--dataset_name {name}: cannot reach the Hub at {endpoint.hostname} "
                         f"({error.strerror or error}) and there is no such folder here; pass a local folder or "
                         f"--train_files") from None
