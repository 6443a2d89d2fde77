"""Values of single flags, parsed or read: a JSON file of settings, --config_overrides, --eval_tasks, and what the GPU
can do for --fp8. Each refuses a bad value with a one-line `UsageError` naming the flag.

Part of the package's base: it imports nothing from the project but `pretrain.base.errors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pretrain.base.errors import UsageError, first_line


def has_fp8_tensor_cores() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def describe_gpu() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    return f"a {torch.cuda.get_device_name()} (compute capability {major}.{minor})"


def read_json_object(flag: str, path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        where = "" if Path(path).is_absolute() else f" in {Path.cwd()} (a relative path starts from where you launch)"
        raise UsageError(f"{flag} {path}: no such file{where}")
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{flag} {path}: not a readable JSON file ({first_line(error)}); fix it") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} {path}: expected a JSON object of DeepSpeed settings")
    return value


def parse_config_overrides(text: str) -> dict[str, Any]:
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--config_overrides: '{item}' is not key=value; write e.g. 'hidden_size=256'")
        try:
            overrides[key.strip()] = json.loads(value)
        except ValueError:
            overrides[key.strip()] = value
    return overrides


def parse_task_specs(specs: list[str] | None, num_fewshot: int) -> list[tuple[str, str, str]]:
    """--eval_tasks NAME=TEST_FILE[,DEV_FILE] ...: (name, test file, dev file or "") of each task."""
    parsed = []
    for spec in specs or []:
        name, equals, files = spec.partition("=")
        if not equals or not name or not files or not name.replace("_", "").replace("-", "").isalnum():
            raise UsageError(f"--eval_tasks {spec}: expected NAME=TEST_FILE or NAME=TEST_FILE,DEV_FILE (NAME of "
                             f"letters, digits, - and _)")
        test, _, dev = files.partition(",")
        if num_fewshot and not dev:
            raise UsageError(f"--eval_tasks {spec}: --eval_tasks_num_fewshot {num_fewshot} needs a DEV_FILE for the "
                             f"examples: NAME=TEST_FILE,DEV_FILE")
        parsed.append((name, test, dev))
    if len({name for name, _, _ in parsed}) < len(parsed):
        raise UsageError("--eval_tasks: a task name is given twice; give each task its own NAME")
    return parsed
