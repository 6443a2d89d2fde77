"""Multiple-choice tasks scored during training, as lm-eval-harness scores them: from local files (C-Eval/CMMLU's
CSV columns, MMLU's Parquet or JSON Lines of question, choices and answer), each choice by the log-likelihood of its
continuation.

    --eval_tasks NAME=TEST_FILE[,DEV_FILE] ...      (few-shot examples: the first --eval_tasks_num_fewshot of DEV_FILE)

A NAME that lm-eval gives a C-Eval, CMMLU or MMLU subject (cmmlu_agronomy, ...) gets that lm-eval task's prompt and
metrics, and several subjects their group's score (benchmarks.py). Any other NAME gets the generic prompt,
lm-eval-harness's MMLU format without a description: the question, one line per choice ("A. ..."), then "Answer:".
Each choice's continuation is " A", " B", ...; acc takes the most likely continuation, acc_norm divides each
log-likelihood by the choice's length in characters first (the harness's definitions). It owns reading, prompting and
scoring; the loop decides when, and sets the time aside.
"""

from __future__ import annotations

import csv
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from pretrain.base.flag_values import parse_task_specs
from pretrain.base.errors import DataError
from pretrain.evaluation.benchmarks import benchmark_of, groups

logger = logging.getLogger("train_loop")

LETTERS = string.ascii_uppercase
FEWSHOT_DELIMITER, TARGET_DELIMITER = "\n\n", " "


@dataclass
class Task:
    name: str
    requests: list[tuple[int, int, list[int], list[int]]]  # (question, choice, context ids, continuation ids)
    choices: list[list[str]]  # each question's continuations' labels: A, B, ...
    golds: list[int]
    metrics: tuple[str, ...] = ("acc", "acc_norm")


def load_tasks(specs: list[str] | None, num_fewshot: int, tokenizer) -> list[Task]:
    """--eval_tasks NAME=TEST[,DEV] ...: each task's questions, read, checked and encoded once, before the data
    build (a bad row is refused before any work)."""
    tasks = []
    for name, test, dev in parse_task_specs(specs, num_fewshot):
        found = benchmark_of(name)
        benchmark, subject = found or (None, "")
        # lm-eval's benchmark prompts fix four choices (A-D); the generic one takes what each row has.
        choices_wanted = 4 if benchmark else None
        examples = read_rows(Path(dev), choices_wanted)[:num_fewshot] if dev else []
        if len(examples) < num_fewshot:
            raise DataError(f"{dev}: {len(examples)} rows, fewer than --eval_tasks_num_fewshot {num_fewshot}")
        cue = benchmark.cue if benchmark else "Answer:"
        context = benchmark.description.format(benchmark.subjects[subject]) if benchmark else ""
        context += "".join(prompt(row, cue) + TARGET_DELIMITER + LETTERS[row["gold"]] + FEWSHOT_DELIMITER
                           for row in examples)
        rows = read_rows(Path(test), choices_wanted)
        choices = [list(LETTERS[:len(row["choices"])]) for row in rows]
        requests = [(index, choice, *encode_pair(tokenizer, context + prompt(row, cue), TARGET_DELIMITER + label))
                    for index, row in enumerate(rows) for choice, label in enumerate(choices[index])]
        tasks.append(Task(name, requests, choices, [row["gold"] for row in rows],
                          benchmark.metrics if benchmark else Task.metrics))
    return tasks


def prompt(row: dict[str, Any], cue: str = "Answer:") -> str:
    lines = [row["question"].strip()] + [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"])]
    return "\n".join(lines) + "\n" + cue


def read_rows(path: Path, choices_wanted: int | None = None) -> list[dict[str, Any]]:
    """Questions from a CSV with C-Eval/CMMLU's columns (question, A, B, C, D, answer; any case; cells read as the
    text they are), Parquet with MMLU's columns, or JSON Lines of {"question", "choices", "answer"} (an index, a
    letter or the choice's text); one line per bad row, and one for a row without `choices_wanted` choices."""
    if not path.is_file():
        raise DataError(f"{path}: no such task file; pass --eval_tasks NAME=PATH with an existing file")
    if path.suffix == ".parquet":
        import pyarrow.parquet

        rows, first_row = pyarrow.parquet.read_table(path).to_pylist(), 1
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            raw = [{key.strip().lower(): value for key, value in row.items() if key} for row in csv.DictReader(handle)]
        letters = [letter for letter in LETTERS if raw and letter.lower() in raw[0]]
        rows = [{"question": row.get("question"), "choices": [row[letter.lower()] for letter in letters],
                 "answer": row.get("answer")} for row in raw]
        first_row = 2  # under the header
    else:
        rows, first_row = [], 1
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rows.append(json.loads(line) if line.strip() else None)
            except ValueError:
                raise DataError(f"{path}: row {number} is not JSON; each line must be one question") from None
    checked = [check_row(path, number, row, choices_wanted) for number, row in enumerate(rows, first_row)
               if row is not None]
    if not checked:
        raise DataError(f"{path}: no questions; a task file needs one question per row")
    return checked


def check_row(path: Path, number: int, row: Any, choices_wanted: int | None = None) -> dict[str, Any]:
    where = f"{path}: row {number}"
    if not isinstance(row, dict):
        raise DataError(f"{where} is not an object with question, choices and answer")
    missing = [key for key in ("question", "choices", "answer") if row.get(key) in (None, "", [])]
    if missing:
        raise DataError(f"{where} has no {missing[0]} (a task row needs question, choices or A-D columns, and "
                        f"answer)")
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or len(choices) > len(LETTERS):
        raise DataError(f"{where}: choices must be a list of 2 to {len(LETTERS)} texts")
    if choices_wanted and len(choices) != choices_wanted:
        raise DataError(f"{where} has {len(choices)} choices; this benchmark's prompt has {choices_wanted} (name the "
                        f"task otherwise for the generic prompt)")
    answer = row["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        gold = answer
    elif isinstance(answer, str) and answer.strip().upper() in LETTERS[:len(choices)] and len(answer.strip()) == 1:
        gold = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer in choices:
        gold = choices.index(answer)
    else:
        raise DataError(f"{where}: answer {answer!r} is not one of the choices ({LETTERS[0]}-"
                        f"{LETTERS[len(choices) - 1]}, an index from 0, or a choice's text)")
    return {"question": str(row["question"]), "choices": [str(choice) for choice in choices], "gold": gold}


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: trailing spaces of the context move to the continuation, the whole is encoded once and
    the continuation is what follows the context's own encoding."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return head, whole[len(head):]


def score_tasks(accelerator, model, tasks: list[Task], batch_size: int, max_length: int, output_dir: str,
                step: int) -> dict[str, float]:
    """task/NAME/METRIC for every task and group (`scores`), the questions spread over the processes; each
    question's log-likelihoods go to output_dir/eval_tasks/NAME.jsonl, a line per evaluation."""
    found = []
    model.eval()
    for task in tasks:
        mine = task.requests[accelerator.process_index::accelerator.num_processes]
        # Every process runs as many forwards (ZeRO-3 gathers weights in each), the last ones padded with a repeat.
        batches = -(-len(task.requests) // (batch_size * accelerator.num_processes))
        scored = log_likelihoods(model, mine, batches, batch_size, max_length, accelerator.device)
        lls = [[0.0] * len(choices) for choices in task.choices]
        for index, choice, value in (item for part in gather_object([scored]) for item in part):
            lls[index][choice] = value
        found.append(lls)
        if accelerator.is_main_process:
            folder = Path(output_dir) / "eval_tasks"
            folder.mkdir(exist_ok=True)
            with open(folder / f"{task.name}.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, "log_likelihoods": lls}) + "\n")
    model.train()
    return scores(tasks, found)


def scores(tasks: list[Task], lls: list[list[list[float]]]) -> dict[str, float]:
    """Each task's metrics from its questions' log-likelihoods, then each lm-eval group's: its tasks' scores
    weighted by their numbers of questions, summed in lm-eval's order (its aggregate_subtask_metrics)."""
    record = {}
    for task, task_lls in zip(tasks, lls):
        best = {"acc": [max(range(len(ll)), key=ll.__getitem__) for ll in task_lls],
                "acc_norm": [max(range(len(ll)), key=lambda c: ll[c] / len(labels[c]))
                             for ll, labels in zip(task_lls, task.choices)]}
        for metric in task.metrics:
            record[f"task/{task.name}/{metric}"] = sum(map(int.__eq__, best[metric], task.golds)) / len(task.golds)
    sizes = {task.name: len(task.golds) for task in tasks}
    for group, (members, metrics) in groups(list(sizes)).items():
        for metric in metrics:
            record[f"task/{group}/{metric}"] = (sum(record[f"task/{name}/{metric}"] * sizes[name] for name in members)
                                                / sum(sizes[name] for name in members))
    return record


def log_likelihoods(model, requests: list, batches: int, batch_size: int, max_length: int, device) -> list:
    """(question, choice, log-likelihood of the continuation) for each request, in `batches` forwards, contexts cut on
    the left to fit. Padded on the left, with the attention mask and each row's own positions, so that every
    continuation ends at the last position: the output projection runs on the last few positions only
    (`logits_to_keep`), not on every token times a 150k vocabulary."""
    results = []
    with torch.no_grad():
        for batch_index in range(batches):
            part = requests[batch_index * batch_size:(batch_index + 1) * batch_size]
            padding = not part
            part = part or requests[:1] or [(0, 0, [0], [0])]
            sequences = [(context + continuation)[-(max_length + 1):][:-1] for _, _, context, continuation in part]
            width = max(map(len, sequences))
            mask = torch.tensor([[0] * (width - len(sequence)) + [1] * len(sequence) for sequence in sequences],
                                device=device)
            input_ids = torch.tensor([[0] * (width - len(sequence)) + sequence for sequence in sequences],
                                     device=device)
            keep = max(len(continuation) for *_, continuation in part)
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           logits_to_keep=keep).logits
            for row, (index, choice, _, continuation) in enumerate(part):
                picked = logits[row, keep - len(continuation):].float().log_softmax(dim=-1)
                value = picked.gather(1, torch.tensor(continuation, device=device)[:, None]).sum().item()
                if not padding:
                    results.append((index, choice, value))
    return results
