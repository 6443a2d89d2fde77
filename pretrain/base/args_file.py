"""One YAML or JSON file of arguments, turned into flags so that it is checked like them: a key given twice is
refused in one line, and a --train_mixture mapping becomes the flag's NAME=WEIGHT:FILES items.

Part of the package's base: it imports nothing from the project but `pretrain.base.errors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.base.errors import UsageError


def args_file_to_argv(path: Path) -> list[str]:
    """A YAML or JSON mapping of flag names to values, turned into flags so that it is checked like them."""
    import yaml

    if not path.is_file():
        raise UsageError(f"{path}: no such arguments file")
    try:
        values = json.loads(path.read_text(), object_pairs_hook=unique_keys) if path.suffix == ".json" else \
            yaml.load(path.read_text(), Loader=unique_keys_yaml_loader())
    except (ValueError, yaml.YAMLError) as error:
        raise UsageError(f"{path}: not valid {path.suffix[1:].upper()} ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of argument names to values")
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if key == "train_mixture" and isinstance(value, dict):
            value = [mixture_item(path, name, source) for name, source in value.items()]
        argv.append(f"--{key}")
        argv.extend(map(str, value) if isinstance(value, list) else [str(value)])
    return argv


def given_twice(key: Any) -> str:
    return f"'{key}' is given twice; give each key once"


def unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A JSON object from its pairs, refusing a key given twice (JSON and YAML would keep the last one silently: a
    mixture source named twice, or a flag set twice, would lose a value without a word)."""
    mapping: dict[Any, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise ValueError(given_twice(key))
        mapping[key] = value
    return mapping


def unique_keys_yaml_loader():
    """yaml.SafeLoader whose mappings refuse a key given twice, naming its line."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            self.flatten_mapping(node)  # merge keys (<<), as SafeLoader's own mappings do
            mapping = {}
            for key_node, value_node in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in mapping:
                    raise yaml.YAMLError(f"{given_twice(key)} (line {key_node.start_mark.line + 1})")
                mapping[key] = self.construct_object(value_node, deep=deep)
            return mapping

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, Loader.construct_mapping)
    return Loader


def mixture_item(path: Path, name: str, source: Any) -> str:
    """A YAML source `NAME: {weight: W, files: [...]}` as the flag's NAME=WEIGHT:FILES item."""
    if not isinstance(source, dict) or set(source) != {"weight", "files"}:
        raise UsageError(f"{path}: train_mixture source {name} must be a mapping with 'weight' and 'files'")
    files = source["files"] if isinstance(source["files"], list) else [source["files"]]
    return f"{name}={source['weight']}:{','.join(map(str, files))}"
