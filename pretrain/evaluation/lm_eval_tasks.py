"""The recipe to check a run's task scores with lm-eval-harness on its exported model: lm-eval task files over the
same local files as the run's --eval_tasks, and the command that runs them.

    python -m pretrain.evaluation.lm_eval_tasks FOLDER NAME=TEST_FILE[,DEV_FILE] ... [--model DIR] [--num_fewshot K]

A C-Eval, CMMLU or MMLU subject's file includes lm-eval's own task file and changes only where its data comes from:
the local files, their cells read as text (as the loop reads them; a CSV loader would read "0.50" as 0.5 and "NA"
as missing). Several subjects of a benchmark get lm-eval's group file with only these subjects in it. Any other
task gets the generic prompt over a copy of its questions in one layout (question, choices, answer's index).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from pretrain.base.errors import UsageError, exit_with
from pretrain.evaluation.benchmarks import BENCHMARKS, MMLU, benchmark_of, groups
from pretrain.evaluation.tasks import read_rows

GENERIC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {files}
test_split: test
{fewshot}output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\n{{% for choice in choices %}}{{{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[loop.index0] \
}}}}. {{{{choice}}}}\\n{{% endfor %}}Answer:"
doc_to_choice: "{{{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[:choices | length] | list }}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def lm_eval_tasks_folder() -> Path:
    """Where the installed lm-eval keeps its task files (found without importing it: that takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("lm-eval is not installed: pip install lm-eval==0.4.13 (requirements-dev.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def write_lm_eval_tasks(folder: Path, specs: list[str]) -> list[str]:
    """A task file in `folder` for each NAME=TEST[,DEV] and one per group; the names to give lm-eval's --tasks (the
    groups, which bring their subjects, and the tasks in no group)."""
    folder.mkdir(parents=True, exist_ok=True)
    harness = lm_eval_tasks_folder()
    names = []
    for spec in specs:
        name, equals, files = spec.partition("=")
        test, _, dev = files.partition(",")
        if not equals or not name or not test:
            raise UsageError(f"{spec}: expected NAME=TEST_FILE or NAME=TEST_FILE,DEV_FILE, as --eval_tasks takes")
        found = benchmark_of(name)
        if found:
            benchmark, subject = found
            if not dev:
                raise UsageError(f"{spec}: lm-eval's {name} reads a few-shot split too, even at 0 shots: give the "
                                 f"subject's dev file, NAME=TEST_FILE,DEV_FILE")
            splits = dict(zip(benchmark.splits, (test, dev)))
            text = benchmark_task(harness / benchmark.task_file(subject), name, splits, benchmark.text_columns)
        else:
            data = {}
            for split, path in (("test", test), ("dev", dev)):
                if path:
                    rows = read_rows(Path(path))
                    data[split] = str((folder / f"{name}.{split}.jsonl").resolve())
                    Path(data[split]).write_text("".join(json.dumps({"question": row["question"], "choices": row[
                        "choices"], "answer": row["gold"]}, ensure_ascii=False) + "\n" for row in rows))
            fewshot = "fewshot_split: dev\nfewshot_config:\n  sampler: first_n\n" if dev else ""
            text = GENERIC.format(name=name, files=json.dumps(data), fewshot=fewshot)
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
        names.append(name)
    found_groups = {group: members for group, (members, _) in groups(names).items()}
    if MMLU.group in found_groups:  # lm-eval's mmlu is a group of its categories' groups
        found_groups[MMLU.group] = [group for group in found_groups if group.startswith("mmlu_")]
    for group, members in found_groups.items():
        benchmark = next(benchmark for benchmark in BENCHMARKS if group.startswith(benchmark.group))
        own = f"_{group}.yaml"
        (folder / own).write_text(f"include: {json.dumps(str(harness / benchmark.folder / own))}\n"
                                  f"task: {json.dumps(members)}\n", encoding="utf-8")
    grouped = {member for members in found_groups.values() for member in members}
    return [group for group in found_groups if group not in grouped] + [name for name in names if name not in grouped]


def benchmark_task(harness_file: Path, name: str, splits: dict[str, str], text_columns: tuple[str, ...]) -> str:
    """A subject's task file: lm-eval's own, with its data from local files."""
    paths = {split: str(Path(path).resolve()) for split, path in splits.items()}
    suffix = Path(paths[next(iter(paths))]).suffix
    loader = {".csv": "csv", ".parquet": "parquet"}.get(suffix, "json")
    text = (f"include: {json.dumps(str(harness_file))}\ntask: {name}\ndataset_path: {loader}\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files: {json.dumps(paths)}\n")
    if loader == "csv":
        converters = ", ".join(f"{json.dumps(column)}: !function builtins.str" for column in text_columns)
        # Only the columns the task reads: C-Eval's dev files have one more (explanation), and splits must agree.
        text += (f"  usecols: {json.dumps(list(text_columns))}\n  keep_default_na: false\n"
                 f"  converters: {{{converters}}}\n")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluation.lm_eval_tasks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the task files go (lm_eval --include_path)")
    parser.add_argument("tasks", nargs="+", help="the run's --eval_tasks values, NAME=TEST_FILE[,DEV_FILE] each")
    parser.add_argument("--model", default="OUTPUT_DIR", help="the exported model's folder, for the command")
    parser.add_argument("--num_fewshot", type=int, default=0, help="the run's --eval_tasks_num_fewshot")
    args = parser.parse_args(argv)
    try:
        names = write_lm_eval_tasks(args.folder, args.tasks)
    except ValueError as error:  # UsageError, DataError: one line naming the flag or file
        exit_with(f"error: {error}", every_rank_has_it=True)
    print(shlex.join(["lm_eval", "--model", "hf", "--model_args", f"pretrained={args.model},dtype=float32",
                      "--include_path", str(args.folder.resolve()), "--tasks", ",".join(names), "--num_fewshot",
                      str(args.num_fewshot), "--batch_size", "8"]))


if __name__ == "__main__":
    main(sys.argv[1:])
