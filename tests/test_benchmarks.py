"""C-Eval, CMMLU and MMLU subjects: named, described and grouped as the installed lm-eval-harness's task files do,
and the prompt a subject's file gets."""

import pytest
import yaml
from transformers import AutoTokenizer

from pretrain.base.errors import DataError, UsageError
from pretrain.evaluation.benchmarks import BENCHMARKS, CEVAL, CMMLU, MMLU, MMLU_CATEGORIES, benchmark_of, groups
from pretrain.evaluation.lm_eval_tasks import lm_eval_tasks_folder, write_lm_eval_tasks
from pretrain.evaluation.tasks import load_tasks


def harness_file(path):
    """A task file of lm-eval's as lm-eval reads it: its includes merged under it."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    include = data.pop("include", None)
    return {**harness_file(path.parent / include), **data} if include else data


@pytest.mark.parametrize("suite", BENCHMARKS, ids=lambda suite: suite.group)
def test_every_subject_is_lm_evals_with_its_description_prompt_and_metrics(suite):
    folder = lm_eval_tasks_folder() / suite.folder
    files = sorted(folder.glob(f"{suite.group}_*.yaml"))
    assert len(files) == len(suite.subjects) == {"cmmlu": 67, "ceval-valid": 52, "mmlu": 57}[suite.group]
    for path in files:
        task = harness_file(path)
        subject = task["dataset_name"]
        assert task["task"] == f"{suite.group}_{subject}" == path.stem
        assert task["description"] == suite.description.format(suite.subjects[subject])
        assert task["doc_to_text"].endswith("\nD. {{%s}}\n%s" % ("choices[3]" if suite is MMLU else "D",
                                                               suite.cue))
        assert task["doc_to_choice"] == ["A", "B", "C", "D"]
        assert (task.get("test_split") or task["validation_split"], task["fewshot_split"]) == suite.splits
        assert task["fewshot_config"] == {"sampler": "first_n"}
        assert tuple(metric["metric"] for metric in task["metric_list"]) == suite.metrics
        if suite is MMLU:
            category = next(name for name, subjects in MMLU_CATEGORIES.items() if subject in subjects)
            assert task["tag"] == f"mmlu_{category}_tasks"
    group = harness_file(folder / f"_{suite.group}.yaml")
    assert all(item["weight_by_size"] for item in group["aggregate_metric_list"])  # what `scores` computes
    assert [item["metric"] for item in group["aggregate_metric_list"]] == list(suite.metrics)
    if suite is MMLU:
        assert group["task"] == [f"mmlu_{category}" for category in MMLU_CATEGORIES]


def test_a_subject_gets_the_description_shots_and_cue_of_lm_evals_task(assets, tmp_path):
    header = "id,question,A,B,C,D,answer,explanation\n"
    (tmp_path / "dev.csv").write_text(header + "0,1 + 1 = ？,1,2,3,4,B,一加一等于二。\n", encoding="utf-8")
    (tmp_path / "val.csv").write_text(header[:-13] + "\n0, 天空是什么颜色？ ,红,蓝,绿,0.50,B\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    task, = load_tasks([f"ceval-valid_logic={tmp_path / 'val.csv'},{tmp_path / 'dev.csv'}"], 1, tokenizer)
    assert task.metrics == ("acc", "acc_norm") and task.golds == [1]
    context = ("以下是中国关于逻辑学的单项选择题，请选出其中的正确答案。\n\n1 + 1 = ？\nA. 1\nB. 2\nC. 3\nD. 4\n答案： B\n\n"
               "天空是什么颜色？\nA. 红\nB. 蓝\nC. 绿\nD. 0.50\n答案：")
    for choice, (_, _, context_ids, continuation_ids) in enumerate(task.requests):
        assert tokenizer.decode(context_ids) == context
        assert tokenizer.decode(continuation_ids) == " " + "ABCD"[choice]


def test_groups_are_lm_evals_over_the_subjects_given():
    assert groups(["cmmlu_anatomy", "mmlu_anatomy", "hinted"]) == {}  # one subject of each: no group
    found = groups(["mmlu_philosophy", "cmmlu_arts", "mmlu_astronomy", "cmmlu_agronomy", "mmlu_virology", "x"])
    assert found == {"cmmlu": (["cmmlu_agronomy", "cmmlu_arts"], CMMLU.metrics),
                     "mmlu": (["mmlu_astronomy", "mmlu_virology", "mmlu_philosophy"], ("acc",)),
                     "mmlu_stem": (["mmlu_astronomy"], ("acc",)), "mmlu_other": (["mmlu_virology"], ("acc",)),
                     "mmlu_humanities": (["mmlu_philosophy"], ("acc",))}
    assert benchmark_of("ceval-valid_law") == (CEVAL, "law") and benchmark_of("my_mmlu_quiz") is None


def test_bad_benchmark_input_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"^--eval_tasks cmmlu_astronomyy: CMMLU has no subject 'astronomyy' \("):
        load_tasks([f"cmmlu_astronomyy={tmp_path / 'test.csv'}"], 0, None)
    (tmp_path / "test.csv").write_text(",Question,A,B,C,Answer\n0,q,a,b,c,A\n")
    with pytest.raises(DataError, match=r"test.csv: row 2 has 3 choices; this benchmark's prompt has 4 \(name the"):
        load_tasks([f"cmmlu_astronomy={tmp_path / 'test.csv'}"], 0, None)
    with pytest.raises(UsageError, match=r"reads a few-shot split too, even at 0 shots: give the subject's dev file"):
        write_lm_eval_tasks(tmp_path / "tasks", [f"cmmlu_astronomy={tmp_path / 'test.csv'}"])
