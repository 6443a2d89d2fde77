"""--eval_tasks: multiple-choice tasks from local files, scored in the loop as lm-eval-harness scores them."""

import csv
import json
import random
import shlex

import pytest
from conftest import launch, run_in_process, tiny_flags
from transformers import AutoModelForCausalLM, AutoTokenizer

from pretrain.base.errors import DataError, UsageError
from pretrain.evaluation import lm_eval_tasks
from pretrain.evaluation.tasks import load_tasks, log_likelihoods, prompt, read_rows, score_tasks

TWO_PROCESS_SCORING = """import json, sys
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from transformers import AutoModelForCausalLM, AutoTokenizer
from pretrain.evaluation.tasks import load_tasks, score_tasks

model, output, *specs = sys.argv[1:]
accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])  # DDP on CPUs
tasks = load_tasks(specs, 5, AutoTokenizer.from_pretrained(model))
record = score_tasks(accelerator, AutoModelForCausalLM.from_pretrained(model), tasks, 8, 256, output, 150)
if accelerator.is_main_process:
    (__import__("pathlib").Path(output) / "record.json").write_text(json.dumps(record))
"""
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


# Questions for the benchmark files, the right answer first (the files rotate the choices). Chinese ones with cells
# that a CSV loader reads as something else unless told (NA, 1.00), and a subject whose choices are all numbers.
CHINESE = [("中国的首都是哪座城市？", "北京", "上海", "广州", "深圳"), ("水在标准大气压下的沸点是多少摄氏度？", "100", "90", "110", "120"),
           ("下列哪一项是钠的元素符号？", "Na", "NA", "N", "Ne"), ("《红楼梦》的作者是谁？", "曹雪芹", "罗贯中", "施耐庵", "吴承恩"),
           ("长城最初修建的主要目的是什么？", "防御外敌", "发展旅游", "运输粮食", "划分省界"),
           ("光合作用主要发生在植物细胞的哪个部位？", "叶绿体", "线粒体", "细胞核", "液泡"), ("唐朝的都城是哪里？", "长安", "洛阳", "南京", "开封"),
           ("下列哪种作物属于粮食作物？", "水稻", "棉花", "甘蔗", "烟草"), ("人体最大的器官是什么？", "皮肤", "心脏", "肝脏", "大脑"),
           ("秦始皇统一六国是在哪一年？", "公元前221年", "公元前206年", "公元前256年", "公元220年"),
           ("下列哪一种肥料主要提供氮元素？", "尿素", "过磷酸钙", "氯化钾", "石灰"), ("“床前明月光”的下一句是什么？", "疑是地上霜", "举头望明月",
                                                                          "低头思故乡", "春眠不觉晓"),
           ("地球绕太阳公转一周大约需要多长时间？", "一年", "一天", "一个月", "十年")]
NUMBERS = [("0.5 + 0.25 等于多少？", "0.75", "0.70", "1.00", "0.50"), ("3 × 4 等于多少？", "12", "7", "14", "1"),
           ("1 的一半是多少？", "0.50", "0.25", "1.50", "2.00"), ("方程 2x = 5 的解是多少？", "2.50", "3.00", "5.00", "10.0"),
           ("10 ÷ 4 等于多少？", "2.5", "2.0", "2.25", "4.0"), ("9 的正平方根是多少？", "3", "4.5", "81", "9.0"),
           ("-2 + 5 等于多少？", "3", "-3", "7", "-7"), ("0.1 × 0.2 等于多少？", "0.02", "0.2", "0.03", "0.002"),
           ("1/4 写成小数是多少？", "0.25", "0.40", "0.14", "0.50"), ("2 的 3 次方是多少？", "8", "6", "9", "5")]
ENGLISH = {"anatomy": [("Which bone is the longest in the human body?", "femur", "tibia", "humerus", "radius"),
                       ("How many chambers does the human heart have?", "four", "two", "three", "five"),
                       ("Which organ produces insulin?", "pancreas", "liver", "kidney", "spleen"),
                       ("The patella is commonly known as the", "kneecap", "shoulder blade", "collarbone",
                        "ankle bone"),
                       ("Which blood vessels carry blood away from the heart?", "arteries", "veins", "capillaries",
                        "lymph vessels"),
                       ("Where does gas exchange take place in the lungs?", "alveoli", "bronchi", "trachea", "pleura"),
                       ("How many pairs of ribs does an adult usually have?", "12", "10", "14", "7"),
                       ("Which part of the brain coordinates balance?", "cerebellum", "medulla", "hypothalamus",
                        "frontal lobe")],
           "astronomy": [("Which planet is closest to the Sun?", "Mercury", "Venus", "Earth", "Mars"),
                         ("What is the largest planet in the Solar System?", "Jupiter", "Saturn", "Neptune", "Earth"),
                         ("About how long does sunlight take to reach Earth?", "8 minutes", "8 seconds", "8 hours",
                          "8 days"),
                         ("Which planet is known as the Red Planet?", "Mars", "Venus", "Jupiter", "Mercury"),
                         ("Which galaxy contains the Solar System?", "the Milky Way", "Andromeda", "Triangulum",
                          "the Large Magellanic Cloud"),
                         ("Which force keeps the planets in orbit?", "gravity", "magnetism", "friction", "None"),
                         ("Which star is nearest to Earth?", "the Sun", "Proxima Centauri", "Sirius", "Polaris")],
           "philosophy": [("Who wrote The Republic?", "Plato", "Aristotle", "Kant", "Hume"),
                          ("'I think, therefore I am' is associated with", "Descartes", "Locke", "Nietzsche", "Hobbes"),
                          ("Which branch of philosophy studies knowledge?", "epistemology", "ethics", "aesthetics",
                           "metaphysics"),
                          ("Utilitarianism judges actions by their", "consequences", "intentions", "duties", "virtues"),
                          ("Who wrote the Critique of Pure Reason?", "Immanuel Kant", "G. W. F. Hegel", "David Hume",
                           "John Stuart Mill"),
                          ("The study of valid reasoning is called", "logic", "rhetoric", "theology", "ontology")]}


def rotated(questions, shift):
    """(question, choices, the answer's index): the right answer moved to a different place in each question."""
    for number, (question, right, *wrong) in enumerate(questions):
        place = (number + shift) % 4
        yield question, wrong[:place] + [right] + wrong[place:], place


@pytest.fixture(scope="module")
def benchmark_specs(tmp_path_factory):
    """--eval_tasks values for two CMMLU subjects, two C-Eval subjects and three MMLU subjects in two categories,
    each in the layout its dataset ships (CMMLU's and C-Eval's CSVs, MMLU's Parquet as lm-eval's dataset has it),
    with 5 dev questions each and tests of different sizes (the groups weigh subjects by size)."""
    import pyarrow
    import pyarrow.parquet

    root = tmp_path_factory.mktemp("benchmarks")
    specs = []
    for subject, dev, test in (("agronomy", CHINESE[:5], CHINESE[5:]), ("chinese_history", CHINESE[8:], CHINESE[:6])):
        for split, questions in (("dev", dev), ("test", test)):
            (root / "cmmlu" / split).mkdir(parents=True, exist_ok=True)
            with open(root / "cmmlu" / split / f"{subject}.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for number, (question, choices, gold) in enumerate(rotated(questions, len(split))):
                    writer.writerow([number, question, *choices, "ABCD"[gold]])
        specs.append(f"cmmlu_{subject}={root}/cmmlu/test/{subject}.csv,{root}/cmmlu/dev/{subject}.csv")
    for subject, dev, test in (("high_school_chinese", CHINESE[6:11], CHINESE[1:10]),
                               ("middle_school_mathematics", NUMBERS[:5], NUMBERS[2:])):
        for split, questions in (("dev", dev), ("val", test)):
            (root / "ceval" / split).mkdir(parents=True, exist_ok=True)
            with open(root / "ceval" / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["id", "question", "A", "B", "C", "D", "answer"] + ["explanation"] * (split == "dev"))
                for number, (question, choices, gold) in enumerate(rotated(questions, len(split))):
                    writer.writerow([number, question, *choices, "ABCD"[gold]] + ["见教材。"] * (split == "dev"))
        specs.append(f"ceval-valid_{subject}={root}/ceval/val/{subject}_val.csv,{root}/ceval/dev/{subject}_dev.csv")
    for subject, questions in ENGLISH.items():
        (root / "mmlu" / subject).mkdir(parents=True)
        for split, part, shift in (("dev", questions[:5], 1), ("test", questions, 2)):
            rows = [{"question": question, "subject": subject, "choices": choices, "answer": gold}
                    for question, choices, gold in rotated(part, shift)]
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows),
                                        root / "mmlu" / subject / f"{split}-00000-of-00001.parquet")
        specs.append(f"mmlu_{subject}={root}/mmlu/{subject}/test-00000-of-00001.parquet,"
                     f"{root}/mmlu/{subject}/dev-00000-of-00001.parquet")
    return specs


def task_flags(assets, task, output, micro, tasks, *extra):
    return tiny_flags(assets, output, task / "cache", "--train_files", task / "train.jsonl",
                      "--validation_split_percentage", 0, "--eval_tasks", *tasks,
                      "--eval_tasks_steps", 50, "--max_steps", 150, "--learning_rate", 5e-3, "--warmup_steps", 10,
                      "--lr_scheduler_type", "constant_with_warmup",
                      "--per_device_train_batch_size", micro, "--logging_steps", 10, *extra)


@pytest.fixture(scope="module")
def trained(assets, hinted_task, benchmark_specs):
    """The same 150 steps on one process (16 blocks a step) and under ZeRO-2 with 2 processes (8 each), scoring the
    hinted task 0-shot, and under ZeRO-2 the benchmarks' subjects too (the tasks given). Not 5-shot: the hinted
    task's 5 examples and question, about 120 tokens, run past the 64-token blocks the model is trained on."""
    single, zero2 = hinted_task / "single", hinted_task / "zero2"
    tasks = [f"hinted={hinted_task / 'test.jsonl'},{hinted_task / 'dev.jsonl'}", *benchmark_specs]
    run_in_process(task_flags(assets, hinted_task, single, 16, tasks[:1]))
    launch("zero2.yaml", 2, task_flags(assets, hinted_task, zero2, 8, tasks))
    return single, zero2, tasks


def final_log_likelihoods(output, name="hinted"):
    return json.loads((output / "eval_tasks" / f"{name}.jsonl").read_text().splitlines()[-1])["log_likelihoods"]


@pytest.mark.slow
def test_a_task_the_model_learns_rises_from_chance_the_same_on_one_process_and_under_zero2(trained, hinted_task):
    single, zero2, _ = trained
    for output in (single, zero2):
        scores = [json.loads(line) for line in (output / "eval_tasks" / "hinted.jsonl").read_text().splitlines()]
        assert [score["step"] for score in scores] == [50, 100, 150]
        records = [record for record in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
                   if "task/hinted/acc" in record]
        assert records[0]["task/hinted/acc"] <= 0.45 and records[-1]["task/hinted/acc"] >= 0.9, records
    # The same answer to every question on both layouts at the end (with 5 shots and without). The log-likelihoods
    # themselves drift apart as the weights do (fp32 sums in another order) and the prompts differ.
    mine, theirs = map(final_log_likelihoods, (single, zero2))
    assert [question.index(max(question)) for question in mine] == [question.index(max(question)) for question in
                                                                    theirs]
    # The scoring spread over two processes, in batches, is each question scored alone on the exported model.
    task, = load_tasks([f"hinted={hinted_task / 'test.jsonl'}"], 0, AutoTokenizer.from_pretrained(zero2))
    model = AutoModelForCausalLM.from_pretrained(zero2).eval()
    final = final_log_likelihoods(zero2)
    for index, choice, value in log_likelihoods(model, task.requests, len(task.requests), 1, 256, "cpu"):
        assert final[index][choice] == pytest.approx(value, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 5])
def test_the_scores_are_lm_eval_harness_scores_on_the_exported_model(trained, hinted_task, benchmark_specs, tmp_path,
                                                                     capsys, shots):
    """lm-eval-harness on the exported ZeRO-2 model, through the recipe (python -m pretrain.evaluation.lm_eval_tasks):
    the benchmarks' subjects by lm-eval's own tasks with only their data pointed at the same files, the hinted task by
    the generic prompt. The same text scored, the same log-likelihood for every question and choice, and the same acc,
    acc_norm and group scores as the loop's: 0-shot, the run's own last evaluation under ZeRO-2 (two processes);
    5-shot, the loop's scoring (score_tasks) of the exported model on two processes (the run scores 0-shot: the
    hinted task's 5 examples would run past the blocks it trains on); and both on one process."""
    import lm_eval
    from accelerate import Accelerator
    from lm_eval.tasks import TaskManager

    _, zero2, specs = trained
    lm_eval_tasks.main([str(tmp_path / "tasks"), *specs, "--model", str(zero2), "--num_fewshot", str(shots)])
    command = shlex.split(capsys.readouterr().out.splitlines()[-1])
    flag = dict(zip(command[1::2], command[2::2]))
    assert flag["--tasks"].split(",") == ["cmmlu", "ceval-valid", "mmlu", "hinted"]
    harness = lm_eval.simple_evaluate(model=flag["--model"], model_args=flag["--model_args"],
                                      tasks=flag["--tasks"].split(","), num_fewshot=int(flag["--num_fewshot"]),
                                      batch_size=int(flag["--batch_size"]), device="cpu", log_samples=True,
                                      task_manager=TaskManager(include_path=flag["--include_path"]))
    tokenizer = AutoTokenizer.from_pretrained(zero2)
    tasks = load_tasks(specs, shots, tokenizer)
    if shots == 0:  # the run's own last evaluation under ZeRO-2
        scorings = {"zero2 run": (zero2, [json.loads(line) for line in (zero2 / "metrics.jsonl").read_text()
                                          .splitlines() if "task/hinted/acc" in line][-1])}
    else:  # the loop's scoring (score_tasks) spread over two processes, as an evaluation of a launch spreads it
        (tmp_path / "score.py").write_text(TWO_PROCESS_SCORING)
        launch("ddp.yaml", 2, [str(zero2), str(tmp_path), *specs], script=tmp_path / "score.py")
        scorings = {"two processes": (tmp_path, json.loads((tmp_path / "record.json").read_text()))}
    one = tmp_path / "one_process"  # and on one process, as a one-process run scores
    one.mkdir()
    scorings["one process"] = (one, score_tasks(Accelerator(cpu=True), AutoModelForCausalLM.from_pretrained(zero2),
                                                tasks, 8, 256, str(one), 150))
    reported = {f"task/{name}/{key.split(',')[0]}": value for name, result in harness["results"].items()
                for key, value in result.items() if key.endswith(",none") and "_stderr" not in key}
    # hinted's 2, CMMLU's and C-Eval's 2 subjects x 2 and groups' 2 each, MMLU's 3 subjects, group and 2 categories
    assert len(reported) == 2 + 2 * (2 * 2 + 2) + 3 + 1 + 2
    for where, (scored, record) in scorings.items():
        for task in tasks:
            samples = sorted(harness["samples"][task.name], key=lambda sample: sample["doc_id"])
            # The same text scored: a barely trained model's log-likelihoods hardly tell one prompt from another.
            assert [tokenizer.decode(context) + tokenizer.decode(continuation) for _, _, context, continuation in
                    task.requests] == [context + continuation for sample in samples for context, continuation in
                                       sample["arguments"]], task.name
            theirs = [[response[0] for response in sample["filtered_resps"]] for sample in samples]
            assert theirs == [pytest.approx(ll, abs=1e-4) for ll in final_log_likelihoods(scored, task.name)], \
                (where, task.name)
        assert {key: value for key, value in record.items() if key.startswith("task/")} == reported, where


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
