"""--eval_tasks: multiple-choice tasks from local files, scored in the loop as lm-eval-harness scores them."""

import json
import random

import pytest
from conftest import launch, run_in_process, tiny_flags
from transformers import AutoModelForCausalLM, AutoTokenizer

from pretrain.base.errors import DataError, UsageError
from pretrain.evaluation.tasks import load_tasks, log_likelihoods, prompt, read_rows

HINTS = "wxyz"  # the last choice's text says which letter is right: a rule a tiny model learns in 150 steps


def hinted_rows(count, seed):
    rng = random.Random(seed)
    return [{"question": "which one?", "choices": ["1", "2", "3", HINTS[answer]], "answer": answer}
            for answer in (rng.randrange(4) for _ in range(count))]


@pytest.fixture(scope="module")
def hinted_task(tmp_path_factory):
    """A training corpus of answered questions, 40 test questions and 5 dev questions in JSON Lines."""
    root = tmp_path_factory.mktemp("task")
    with open(root / "train.jsonl", "w") as handle:
        for row in hinted_rows(3000, 1):
            handle.write(json.dumps({"text": prompt(row) + " " + "ABCD"[row["answer"]]}) + "\n")
    for name, count, seed in (("test", 40, 2), ("dev", 5, 3)):
        with open(root / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in hinted_rows(count, seed))
    return root


def task_flags(assets, task, output, micro, *extra):
    return tiny_flags(assets, output, task / "cache", "--train_files", task / "train.jsonl",
                      "--validation_split_percentage", 0, "--eval_tasks", f"hinted={task / 'test.jsonl'}",
                      "--eval_tasks_steps", 50, "--max_steps", 150, "--learning_rate", 5e-3, "--warmup_steps", 10,
                      "--lr_scheduler_type", "constant_with_warmup",
                      "--per_device_train_batch_size", micro, "--logging_steps", 10, *extra)


@pytest.fixture(scope="module")
def trained(assets, hinted_task):
    """The same 150 steps on one process (16 blocks a step) and under ZeRO-2 with 2 processes (8 each)."""
    single, zero2 = hinted_task / "single", hinted_task / "zero2"
    run_in_process(task_flags(assets, hinted_task, single, 16))
    launch("zero2.yaml", 2, task_flags(assets, hinted_task, zero2, 8))
    return single, zero2


def final_log_likelihoods(output):
    return json.loads((output / "eval_tasks" / "hinted.jsonl").read_text().splitlines()[-1])["log_likelihoods"]


@pytest.mark.slow
def test_a_task_the_model_learns_rises_from_chance_the_same_on_one_process_and_under_zero2(trained, hinted_task):
    single, zero2 = trained
    for output in trained:
        scores = [json.loads(line) for line in (output / "eval_tasks" / "hinted.jsonl").read_text().splitlines()]
        assert [score["step"] for score in scores] == [50, 100, 150]
        records = [record for record in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
                   if "task/hinted/acc" in record]
        assert records[0]["task/hinted/acc"] <= 0.45 and records[-1]["task/hinted/acc"] >= 0.9, records
    # The same answer to every question on both layouts at the end. The log-likelihoods themselves drift apart as the
    # weights do (fp32 sums in another order: 4e-3 relative at step 50, tenths by step 150).
    mine, theirs = map(final_log_likelihoods, trained)
    assert [question.index(max(question)) for question in mine] == [question.index(max(question)) for question in
                                                                    theirs]
    # The scoring spread over two processes, in batches, is each question scored alone on the exported model.
    task, = load_tasks([f"hinted={hinted_task / 'test.jsonl'}"], 0, AutoTokenizer.from_pretrained(zero2))
    model = AutoModelForCausalLM.from_pretrained(zero2).eval()
    final = final_log_likelihoods(zero2)
    for index, choice, value in log_likelihoods(model, task.requests, len(task.requests), 1, 256, "cpu"):
        assert final[index][choice] == pytest.approx(value, abs=1e-5)


HARNESS_TASK = r"""task: hinted
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\n{{% for choice in choices %}}{{{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[loop.index0] }}}}. {{{{choice}}}}\n{{% endfor %}}Answer:"
doc_to_choice: "{{{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[:choices | length] | list }}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 2])
def test_the_scores_are_lm_eval_harness_scores_on_the_exported_model(trained, hinted_task, tmp_path, shots):
    """lm-eval-harness on the exported ZeRO-2 model, with a task YAML over the same local files: the same
    log-likelihood for every question and choice, so the same acc and acc_norm; 0-shot is the run's own last
    evaluation, 2-shot is scored with the loop's functions."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    zero2 = trained[1]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hinted.yaml").write_text(HARNESS_TASK.format(test=hinted_task / "test.jsonl",
                                                                        dev=hinted_task / "dev.jsonl"))
    harness = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={zero2},dtype=float32", tasks=["hinted"],
                                      num_fewshot=shots, batch_size=8, device="cpu", log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    theirs = {sample["doc_id"]: [response[0] for response in sample["filtered_resps"]]
              for sample in harness["samples"]["hinted"]}
    if shots == 0:
        mine = final_log_likelihoods(zero2)
        record = [json.loads(line) for line in (zero2 / "metrics.jsonl").read_text().splitlines()
                  if "task/hinted/acc" in line][-1]
    else:
        task, = load_tasks([f"hinted={hinted_task / 'test.jsonl'},{hinted_task / 'dev.jsonl'}"], shots,
                           AutoTokenizer.from_pretrained(zero2))
        mine = [[0.0] * 4 for _ in task.golds]
        for index, choice, value in log_likelihoods(AutoModelForCausalLM.from_pretrained(zero2).eval(),
                                                    task.requests, len(task.requests), 1, 256, "cpu"):
            mine[index][choice] = value
        record = {"task/hinted/acc": sum(ll.index(max(ll)) == gold for ll, gold in zip(mine, task.golds)) / 40}
    assert [theirs[index] for index in range(len(mine))] == [pytest.approx(ll, abs=1e-4) for ll in mine]
    assert harness["results"]["hinted"]["acc,none"] == record["task/hinted/acc"]
    assert harness["results"]["hinted"]["acc_norm,none"] == record.get("task/hinted/acc_norm", record["task/hinted/acc"])


def test_the_prompt_and_the_continuations_are_the_harness_mmlu_format(assets, tmp_path):
    (tmp_path / "dev.jsonl").write_text(json.dumps({"question": "2 + 2 =", "choices": ["3", "4"], "answer": 1}) + "\n")
    (tmp_path / "test.csv").write_text("id,Question,A,B,C,D,Answer\n7,天空是什么颜色？,红,蓝,绿,黑,B\n",
                                       encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    task, = load_tasks([f"colours={tmp_path / 'test.csv'},{tmp_path / 'dev.jsonl'}"], 1, tokenizer)
    context = "2 + 2 =\nA. 3\nB. 4\nAnswer: B\n\n天空是什么颜色？\nA. 红\nB. 蓝\nC. 绿\nD. 黑\nAnswer:"
    assert task.golds == [1] and task.choices == [["A", "B", "C", "D"]]
    for choice, (_, _, context_ids, continuation_ids) in enumerate(task.requests):
        assert tokenizer.decode(context_ids) == context
        assert tokenizer.decode(continuation_ids) == " " + "ABCD"[choice]


@pytest.mark.parametrize("content, problem", [
    ("", "no questions; a task file needs one question per row"),
    ('{"question": "q", "choices": ["a", "b"]}\n', "row 1 has no answer"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "c"}\n', "row 1: answer 'c' is not one of the choices (A-B"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}\n', "row 1: answer 2 is not one of the choices"),
    ('{"question": "q", "choices": ["a"], "answer": 0}\n', "row 1: choices must be a list of 2 to 26 texts"),
    ("not json\n", "row 1 is not JSON"),
    ("question,A,B,answer\nq,a,b,C\n", "row 2: answer 'C' is not one of the choices (A-B"),
    ("question,A,B\nq,a,b\n", "row 2 has no answer"),
])
def test_a_bad_task_file_is_one_line_naming_the_file_and_the_row(tmp_path, content, problem):
    path = tmp_path / ("task.csv" if content.startswith("question,") else "task.jsonl")
    path.write_text(content)
    with pytest.raises(DataError) as error:
        read_rows(path)
    assert str(error.value).startswith(f"{path}: ") and problem in str(error.value) and "\n" not in str(error.value)


def test_bad_task_flags_are_one_line(assets, tmp_path):
    for spec, problem in (("no_equals_sign", "error: --eval_tasks no_equals_sign: expected NAME=TEST_FILE"),
                          ("x=missing.jsonl", "error: missing.jsonl: no such task file")):
        with pytest.raises(SystemExit) as stopped:
            run_in_process(tiny_flags(assets, tmp_path / "run", tmp_path / "cache", "--eval_tasks", spec,
                                      "--max_steps", 1), entry="cli")
        assert str(stopped.value.code).startswith(problem)
    with pytest.raises(UsageError, match="needs a DEV_FILE"):
        load_tasks(["x=a.jsonl"], 2, None)
