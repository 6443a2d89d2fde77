"""What evaluation costs at the default cadence: eval_loss and eval_bpb on the held-out blocks (the default budget),
and with multiple-choice tasks (--eval_tasks), as a share of the run's wall clock.

Shape like our users': Chinese-like text, a byte-level BPE of more than 65,536 entries, a model whose vocabulary is
Qwen's 151,936 (2 layers x 256), blocks of 128. Each run trains --steps steps and evaluates every --every steps (a
stand-in for the default --eval_steps = --save_steps = 500, to which the default number of held-out blocks is
proportional); the share is an evaluation's seconds (eval_s in metrics.jsonl) over those seconds plus the training
between two evaluations, as the run itself says after its first evaluation.

    python bench/eval_cost.py [--steps 100] [--every 50] [--questions 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_pipeline import cjk_corpus, cjk_tokenizer  # noqa: E402


def task_file(path: Path, corpus: Path, questions: int) -> Path:
    """Questions whose choices are sentences of the corpus: which one comes first in its document."""
    rng = random.Random(0)
    texts = [json.loads(line)["text"] for _, line in zip(range(4 * questions), corpus.open(encoding="utf-8"))]
    with open(path, "w", encoding="utf-8") as out:
        for index in range(questions):
            sentences = [text[:30] for text in rng.sample(texts, 4)]
            out.write(json.dumps({"question": f"第{index + 1}题：哪一句最通顺？", "choices": sentences,
                                  "answer": rng.randrange(4)}, ensure_ascii=False) + "\n")
    return path


def run(work: Path, name: str, options, extra: list[str]) -> dict:
    output = work / name
    command = [sys.executable, str(ROOT / "train_loop.py"), "--config_name", str(work / "config"),
               "--tokenizer_name", str(work / "tokenizer"), "--train_files", str(work / "corpus.jsonl"),
               "--data_cache_dir", str(work / "cache"), "--output_dir", str(output), "--block_size", "128",
               "--per_device_train_batch_size", "8", "--max_steps", str(options.steps), "--save_steps", "1000",
               "--eval_steps", str(options.every), "--logging_steps", "10", "--report_to", "none",
               "--learning_rate", "1e-3", "--warmup_steps", "10", *extra]
    subprocess.run(command, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if "tokens_per_s" in record]
    evaluations = [record for record in records if "eval_loss" in record or any(k.startswith("task/") for k in record)]
    timed = [record["eval_s"] for record in train if record["eval_s"]]  # the last evaluation is after the last record
    return {"timed": len(timed), "eval_s": sum(timed) / len(timed),
            "step_s": sorted(record["step_time_s"] for record in train)[len(train) // 2],
            "bpb": evaluations[-1].get("eval_bpb"), "acc": evaluations[-1].get("task/cjk/acc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=50, help="steps between evaluations")
    parser.add_argument("--questions", type=int, default=100, help="questions of the generated task")
    parser.add_argument("--documents", type=int, default=20000, help="documents of the generated corpus")
    options = parser.parse_args()
    from transformers import AutoTokenizer, Qwen2Config

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        corpus = cjk_corpus(work / "corpus.jsonl", options.documents)
        tokenizer = AutoTokenizer.from_pretrained(cjk_tokenizer(corpus, work / "tokenizer"))
        Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id).save_pretrained(work / "config")
        task = task_file(work / "task.jsonl", corpus, options.questions)
        sides = {"held-out blocks (default budget): eval_loss, eval_bpb": [],
                 f"+ --eval_tasks ({options.questions} questions x 4 choices)": ["--eval_tasks", f"cjk={task}"]}
        print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
              f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; tokenizer "
              f"{len(tokenizer)} entries, model vocabulary 151,936; {options.steps} steps of 8 blocks of 128, an "
              f"evaluation every {options.every}\n")
        print(f"| evaluation | s per evaluation | training s between two ({options.every} x the median step) | share "
              f"of wall clock | eval_bpb | task acc |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, extra in sides.items():
            result = run(work, f"run{len(extra)}", options, extra)
            training = options.every * result["step_s"]
            acc = "" if result["acc"] is None else f"{result['acc']:.2f}"
            print(f"| {name} | {result['eval_s']:.2f} | {training:.1f} | "
                  f"{result['eval_s'] / (result['eval_s'] + training):.1%} | {result['bpb']:.3f} | {acc} |", flush=True)


if __name__ == "__main__":
    main()
