"""eval_bpb: bits per byte of the held-out text, which compares across tokenizers where a loss per token does not;
and the perplexity beside it, never capped."""

import json
import math
import random
import re

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_in_process, tiny_flags
from transformers import AutoModelForCausalLM, AutoTokenizer

import data_utils
from pretrain.base.arguments import DEFAULT_SPLIT_SEED, DataArguments
from pretrain.evaluation.heldout import perplexity, token_byte_lengths

MIXED_TEXTS = ["天气很好，我们去公园散步吧。", "数据清洗 data cleaning 很重要！", "naïve café — 3½ €", "一二三四五六七八九十。"]


def cjk_tokenizer(tmp_path):
    """A Qwen2-style byte-level BPE trained on Chinese and mixed text: its merges split many characters' bytes."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    rng = random.Random(0)
    texts = ["".join(rng.sample(MIXED_TEXTS, 3)) for _ in range(200)]
    tokenizer = Qwen2Tokenizer().train_new_from_iterator(texts, vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.save_pretrained(tmp_path / "cjk")
    return AutoTokenizer.from_pretrained(tmp_path / "cjk")


def test_perplexity_is_the_number_or_inf_never_a_cap():
    """Eval losses of 60.7 and 1596 (a diverged run's) both showed 5.185e+21 when exp was capped at 50."""
    assert perplexity(60.7) == math.exp(60.7) > 2e26 and perplexity(709.7) < math.inf
    assert perplexity(1596.0) == math.inf


@pytest.mark.parametrize("which", ["demo", "cjk"])
def test_the_bytes_of_a_texts_tokens_are_the_texts_utf8_bytes(assets, tmp_path, which):
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"]) if which == "demo" else cjk_tokenizer(tmp_path)
    lengths = token_byte_lengths(tokenizer, len(tokenizer) + 7)  # a model vocabulary padded past the tokenizer's
    texts = MIXED_TEXTS + [json.loads(line)["text"] for line in assets["small"].read_text().splitlines()[:50]]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")), text
    assert lengths[tokenizer.eos_token_id] == 0 and lengths[-7:].tolist() == [0] * 7
    rare = tokenizer("龘靐齉")["input_ids"]  # characters it never saw: single bytes, no token decodes to a character
    assert int(lengths[rare].sum()) == 9 and all("\ufffd" in tokenizer.decode([index]) for index in rare)


def test_eval_bpb_is_the_token_losses_over_the_held_out_bytes(assets, tmp_path, capfd):
    """Recomputed by hand from the final model: each held-out block's target losses over the UTF-8 bytes its targets
    decode to, summed over blocks (each token is the target of one block, so a document that crosses a block
    boundary is counted once)."""
    output = tmp_path / "run"
    run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 6, "--eval_steps", 3,
                              "--validation_split_percentage", 20, "--max_eval_samples", 40))
    assert re.search(r"evaluation: [\d.]+ s every 3 steps of [\d.]+ s, [\d.]+% of the run's time", capfd.readouterr().err)
    _, evals = read_metrics(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    data_args = DataArguments(**json.loads((output / "run_config.json").read_text())["data"])
    blocks = np.asarray(data_utils.prepare_data(data_args, tokenizer, seed=DEFAULT_SPLIT_SEED).validation)[:40]
    eos = tokenizer.eos_token_id
    assert any(block[-1] != eos for block in blocks)  # documents do cross block boundaries here
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    nats, text_bytes = 0.0, 0
    with torch.no_grad():
        for block in torch.from_numpy(blocks.astype(np.int64)):
            losses = torch.nn.functional.cross_entropy(model(input_ids=block[None]).logits[0, :-1], block[1:],
                                                       reduction="none")
            nats += float(losses[block[1:] != eos].double().sum())
            text_bytes += len(tokenizer.decode(block[1:], skip_special_tokens=True).encode("utf-8"))
    assert evals[-1]["eval_bpb"] == pytest.approx(nats / (math.log(2) * text_bytes), rel=1e-6)
    assert evals[-1]["eval_bpb"] < evals[-1]["eval_loss"] / math.log(2)  # a token of this tokenizer is > 1 byte
