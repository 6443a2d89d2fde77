"""C-Eval, CMMLU and MMLU as lm-eval-harness 0.4.13 names, prompts and groups their subjects.

A task named as lm-eval names a subject -- cmmlu_<subject>, ceval-valid_<subject>, mmlu_<subject> -- is prompted as
that lm-eval task prompts it: the benchmark's description with the subject's name in it (the Chinese one for C-Eval
and CMMLU), the shots, each question then "答案：" (C-Eval, CMMLU) or "Answer:" (MMLU), and the continuations " A" to
" D". Its metrics are the task's: acc and acc_norm for C-Eval and CMMLU, acc for MMLU. Several subjects of one
benchmark also get the benchmark's group score (and MMLU's categories'): the mean of the subjects' scores weighted
by their numbers of questions, as lm-eval's groups aggregate. The names are the ones lm-eval's task files carry
(tests/test_benchmarks.py checks every one against the installed lm-eval).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.base.errors import UsageError


def subject_table(text: str) -> dict[str, str]:
    """"key name | key name" lines: each subject's key and its name in the description."""
    return dict(item.split() for item in text.replace("\n", "|").split("|") if item.strip())


@dataclass(frozen=True)
class Benchmark:
    group: str  # lm-eval's group, and its tasks' prefix
    title: str  # as users know it
    description: str  # before the shots; {} is the subject's name
    cue: str  # the prompt's last words, after the choices
    metrics: tuple[str, ...]
    splits: tuple[str, str]  # the names of lm-eval's evaluated split and few-shot split
    text_columns: tuple[str, ...]  # a CSV's columns that lm-eval's task reads (read as text, as the loop reads them)
    folder: str  # its task files under lm_eval/tasks
    subjects: dict[str, str]

    def task_file(self, subject: str) -> str:
        return f"{self.folder}/{self.group}_{subject}.yaml"


CMMLU = Benchmark("cmmlu", "CMMLU", "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n", "答案：", ("acc", "acc_norm"),
                  ("test", "dev"), ("Question", "A", "B", "C", "D", "Answer"), "cmmlu", subject_table("""
agronomy 农学 | anatomy 解剖学 | ancient_chinese 古汉语 | arts 艺术学 | astronomy 天文学 | business_ethics 商业伦理
chinese_civil_service_exam 中国公务员考试 | chinese_driving_rule 中国驾驶规则 | chinese_food_culture 中国饮食文化
chinese_foreign_policy 中国外交政策 | chinese_history 中国历史 | chinese_literature 中国文学
chinese_teacher_qualification 中国教师资格 | clinical_knowledge 临床知识 | college_actuarial_science 大学精算学
college_education 大学教育学 | college_engineering_hydrology 大学工程水文学 | college_law 大学法律 | college_mathematics 大学数学
college_medical_statistics 大学医学统计 | college_medicine 大学医学 | computer_science 计算机科学 | computer_security 计算机安全
conceptual_physics 概念物理学 | construction_project_management 建设工程管理 | economics 经济学 | education 教育学
electrical_engineering 电气工程 | elementary_chinese 小学语文 | elementary_commonsense 小学常识
elementary_information_and_technology 小学信息技术 | elementary_mathematics 初等数学 | ethnology 民族学 | food_science 食品科学
genetics 遗传学 | global_facts 全球事实 | high_school_biology 高中生物 | high_school_chemistry 高中化学
high_school_geography 高中地理 | high_school_mathematics 高中数学 | high_school_physics 高中物理学
high_school_politics 高中政治 | human_sexuality 人类性行为 | international_law 国际法学 | journalism 新闻学 | jurisprudence 法理学
legal_and_moral_basis 法律与道德基础 | logical 逻辑学 | machine_learning 机器学习 | management 管理学 | marketing 市场营销
marxist_theory 马克思主义理论 | modern_chinese 现代汉语 | nutrition 营养学 | philosophy 哲学 | professional_accounting 专业会计
professional_law 专业法学 | professional_medicine 专业医学 | professional_psychology 专业心理学 | public_relations 公共关系
security_study 安全研究 | sociology 社会学 | sports_science 体育学 | traditional_chinese_medicine 中医中药 | virology 病毒学
world_history 世界历史 | world_religions 世界宗教"""))

CEVAL = Benchmark("ceval-valid", "C-Eval", "以下是中国关于{}的单项选择题，请选出其中的正确答案。\n\n", "答案：", ("acc", "acc_norm"),
                  ("val", "dev"), ("question", "A", "B", "C", "D", "answer"), "ceval", subject_table("""
accountant 注册会计师 | advanced_mathematics 高等数学 | art_studies 艺术学 | basic_medicine 基础医学
business_administration 工商管理 | chinese_language_and_literature 中国语言文学 | civil_servant 公务员
clinical_medicine 临床医学 | college_chemistry 大学化学 | college_economics 大学经济学 | college_physics 大学物理
college_programming 大学编程 | computer_architecture 计算机组成 | computer_network 计算机网络 | discrete_mathematics 离散数学
education_science 教育学 | electrical_engineer 注册电气工程师 | environmental_impact_assessment_engineer 环境影响评价工程师
fire_engineer 注册消防工程师 | high_school_biology 高中生物 | high_school_chemistry 高中化学 | high_school_chinese 高中语文
high_school_geography 高中地理 | high_school_history 高中历史 | high_school_mathematics 高中数学 | high_school_physics 高中物理
high_school_politics 高中政治 | ideological_and_moral_cultivation 思想道德修养与法律基础 | law 法学 | legal_professional 法律职业资格
logic 逻辑学 | mao_zedong_thought 毛泽东思想和中国特色社会主义理论体系概论 | marxism 马克思主义基本原理 | metrology_engineer 注册计量师
middle_school_biology 初中生物 | middle_school_chemistry 初中化学 | middle_school_geography 初中地理
middle_school_history 初中历史 | middle_school_mathematics 初中数学 | middle_school_physics 初中物理
middle_school_politics 初中政治 | modern_chinese_history 近代史纲要 | operating_system 操作系统 | physician 医师资格
plant_protection 植物保护 | probability_and_statistics 概率统计 | professional_tour_guide 导游资格 | sports_science 体育学
tax_accountant 税务师 | teacher_qualification 教师资格 | urban_and_rural_planner 注册城乡规划师 | veterinary_medicine 兽医学"""))

# MMLU's categories, each a group of lm-eval's (mmlu_stem, ...), in the order lm-eval's mmlu group lists them.
MMLU_CATEGORIES = {category: subjects.split() for category, subjects in {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
                       "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions"}.items()}

MMLU = Benchmark("mmlu", "MMLU", "The following are multiple choice questions (with answers) about {}.\n\n", "Answer:",
                 ("acc",), ("test", "dev"), (), "mmlu/default",
                 {subject: subject.replace("_", " ") for subjects in MMLU_CATEGORIES.values() for subject in subjects})

BENCHMARKS = (CMMLU, CEVAL, MMLU)


def benchmark_of(task: str) -> tuple[Benchmark, str] | None:
    """The benchmark and subject of a task named as lm-eval names a subject, or None for any other name."""
    for benchmark in BENCHMARKS:
        if task.startswith(benchmark.group + "_"):
            subject = task[len(benchmark.group) + 1:]
            if subject not in benchmark.subjects:
                raise UsageError(f"--eval_tasks {task}: {benchmark.title} has no subject {subject!r} (lm-eval's "
                                 f"names: {', '.join(sorted(benchmark.subjects)[:3])}, ...); name the task as lm-eval "
                                 f"does, or not {benchmark.group}_... for the generic prompt")
            return benchmark, subject
    return None


def groups(tasks: list[str]) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """lm-eval's groups over these tasks, {group: (its tasks, its metrics)}: each benchmark given two subjects or
    more, and then MMLU's categories among them, each group's tasks in the order lm-eval's group lists them."""
    found: dict[str, tuple[list[str], tuple[str, ...]]] = {}
    for benchmark in BENCHMARKS:
        order = list(benchmark.subjects)
        members = sorted((task for task in tasks if (benchmark_of(task) or (None,))[0] is benchmark),
                         key=lambda task: order.index(task[len(benchmark.group) + 1:]))
        if len(members) < 2:
            continue
        found[benchmark.group] = members, benchmark.metrics
        if benchmark is MMLU:
            for category, subjects in MMLU_CATEGORIES.items():
                inside = [task for task in members if task[len("mmlu_"):] in subjects]
                if inside:
                    found[f"mmlu_{category}"] = inside, benchmark.metrics
    return found

