"""The built-in demo: a generated corpus with learnable structure, a byte-level BPE tokenizer trained on it, and the
greedy sample that ends a demo run.

It owns what `python train_loop.py` with no data flags trains on (and what the tests and benches generate); it must
not tokenize corpora into caches or know about training.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path


_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
_THINGS = ["apples", "books", "coins", "lamps", "maps", "pens", "rocks", "shells", "stamps", "tickets"]
_PLACES = ["the park", "the market", "the library", "the harbor", "the garden", "the station"]


def _demo_document(rng: random.Random) -> str:
    """A short story whose numbers and names follow rules a small model can learn."""
    name, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    have, more = rng.randint(1, 9), rng.randint(1, 9)
    start = rng.randint(1, 20)
    counting = " ".join(str(n) for n in range(start, start + rng.randint(4, 8)))
    return (f"{name} went to {rng.choice(_PLACES)} with {have} {thing}. "
            f"{other} gave {name} {more} more {thing}. "
            f"now {name} has {have + more} {thing}. "
            f"{name} counted: {counting}.")


def write_demo_corpus(path: Path | str, documents: int = 6000, seed: int = 0) -> Path:
    """A JSON Lines file of `documents` generated stories (the same for the same seed), written atomically."""
    rng, path = random.Random(seed), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        for _ in range(documents):
            handle.write(json.dumps({"text": _demo_document(rng)}) + "\n")
    os.replace(temporary, path)
    return path


def train_demo_tokenizer(corpus: Path, output_dir: Path, vocab_size: int = 512) -> Path:
    """Train a Qwen2-style byte-level BPE tokenizer (EOS <|endoftext|>) on the corpus and save it.

    It is a Qwen2Tokenizer, so that AutoTokenizer rebuilds the very same pipeline from a saved Qwen2 model folder.
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    texts = (json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines())
    tokenizer = Qwen2Tokenizer().train_new_from_iterator(
        texts, vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    temporary = output_dir.with_name(output_dir.name + f".tmp-{os.getpid()}")
    tokenizer.save_pretrained(temporary)
    try:
        os.rename(temporary, output_dir)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
    return output_dir


def ensure_demo_assets(root: Path) -> tuple[Path, Path]:
    """The demo corpus and tokenizer, generated once into `root`: returns (corpus path, tokenizer dir)."""
    root = Path(root).expanduser()
    corpus = root / "demo_corpus.jsonl"
    tokenizer_dir = root / "tokenizer"
    if not corpus.exists():
        write_demo_corpus(corpus)
    if not (tokenizer_dir / "tokenizer.json").exists():
        train_demo_tokenizer(corpus, tokenizer_dir)
    return corpus, tokenizer_dir


def print_sample(model, tokenizer, accelerator, prompt: str = "alice went to") -> None:
    """A short greedy continuation, to see what the model learned (`model`: unwrapped)."""
    import logging

    import torch

    if accelerator.state.deepspeed_plugin is not None and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return  # generation under ZeRO-3 needs every rank in each forward; load the saved model instead
    if not accelerator.is_main_process:
        return
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(accelerator.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                use_cache=True)
    logging.getLogger("train_loop").info(f"sample: {tokenizer.decode(output[0], skip_special_tokens=True)!r}")
