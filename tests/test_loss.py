"""--loss_chunk_size: the chunked output projection + cross-entropy gives transformers' loss and gradients."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_in_process, tiny_flags

from pretrain.base.errors import UsageError
from pretrain.model.chunked_loss import compute_loss_in_chunks


@pytest.fixture()
def model_pair(assets):
    """A tiny Qwen2 (tied head) and a copy of it whose loss is computed in chunks of 7 tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets["config"]))
    chunked = copy.deepcopy(reference)
    compute_loss_in_chunks(chunked, 7)  # 3 x 19 targets: chunks do not divide the tokens
    ids = torch.randint(0, reference.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 5:9] = -100  # ignored targets are left out of the sum and of the count
    return reference, chunked, ids, labels


def test_loss_and_every_gradient_match_transformers(model_pair):
    reference, chunked, ids, labels = model_pair
    expected = reference(input_ids=ids, labels=labels).loss
    got = chunked(input_ids=ids, labels=labels).loss
    (expected * 3).backward()  # a scaled loss (as with accumulation or fp16 loss scaling) scales the gradients
    (got * 3).backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for (name, mine), theirs in zip(chunked.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert chunked.get_output_embeddings().weight is chunked.get_input_embeddings().weight  # still tied


def test_bf16_autocast_stays_close(model_pair):
    reference, chunked, ids, labels = model_pair
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(input_ids=ids, labels=labels).loss
        got = chunked(input_ids=ids, labels=labels).loss
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), rel=2e-3)
    expected.backward()
    got.backward()
    for (name, mine), theirs in zip(chunked.named_parameters(), reference.parameters()):
        assert mine.grad.dtype == torch.float32, name  # the fp32 masters get fp32 gradients
        assert (mine.grad - theirs.grad).norm() < 0.03 * theirs.grad.norm(), name  # bf16 rounding, not a bug


def test_calls_without_labels_are_the_models_own(model_pair):
    reference, chunked, ids, _ = model_pair
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=ids).logits, reference(input_ids=ids).logits)
    prompt = ids[:1, :6]
    assert torch.equal(chunked.generate(prompt, max_new_tokens=5, do_sample=False),
                       reference.generate(prompt, max_new_tokens=5, do_sample=False))


def test_training_with_chunks_matches_training_without(assets, tmp_path):
    """Eight steps with accumulation, evaluation, then the saved model: the same as without chunking."""
    losses, eval_losses = {}, {}
    for chunk in (0, 50):
        output = tmp_path / f"chunk{chunk}"
        run_in_process(tiny_flags(assets, output, tmp_path / "cache", "--max_steps", 8, "--eval_steps", 4,
                                  "--gradient_accumulation_steps", 2, "--loss_chunk_size", chunk,
                                  "--per_device_eval_batch_size", 3))  # 3 blocks x 63 targets: 4 chunks, uneven
        train, evals = read_metrics(output)
        losses[chunk] = [record["loss"] for record in train.values()]
        eval_losses[chunk] = [record["eval_loss"] for record in evals]
    np.testing.assert_allclose(losses[50], losses[0], rtol=1e-5)
    assert len(losses[0]) == 8 and losses[0][-1] < losses[0][0]
    np.testing.assert_allclose(eval_losses[50], eval_losses[0], rtol=1e-6)
    assert len(eval_losses[0]) == 2 and eval_losses[0][1] < eval_losses[0][0]
    saved = [json.loads((tmp_path / f"chunk{chunk}" / "config.json").read_text()) for chunk in (0, 50)]
    assert saved[0] == saved[1]  # nothing about chunking leaks into the saved model


def test_a_head_that_is_not_a_plain_linear_is_refused(model_pair):
    _, chunked, _, _ = model_pair
    chunked.config.final_logit_softcapping = 30.0
    with pytest.raises(UsageError, match="--loss_chunk_size: Qwen2ForCausalLM does not end in a plain"):
        compute_loss_in_chunks(chunked, 8)


def test_liger_kernel_without_cuda_warns_once_and_trains_with_the_chunked_loss(assets, tmp_path, capfd):
    from pretrain.model.speedups import LIGER_CPU_CHUNK

    if torch.cuda.is_available():
        pytest.skip("CUDA present: Liger-Kernel itself runs")
    losses = {}
    for name, extra in (("liger", ["--use_liger_kernel"]), ("chunked", ["--loss_chunk_size", LIGER_CPU_CHUNK])):
        run_in_process(tiny_flags(assets, tmp_path / name, tmp_path / "cache", "--max_steps", 3, *extra))
        losses[name] = [record["loss"] for record in read_metrics(tmp_path / name)[0].values()]
        if name == "liger":
            warnings = [line for line in capfd.readouterr().err.splitlines() if "--use_liger_kernel" in line]
            assert len(warnings) == 1 and warnings[0].endswith(
                "--use_liger_kernel: no CUDA GPU, and Liger-Kernel's Triton kernels need one; training with the "
                f"model's own kernels and --loss_chunk_size {LIGER_CPU_CHUNK} instead of the fused loss")
    assert losses["liger"] == losses["chunked"]
    with pytest.raises(UsageError, match="^--use_liger_kernel with --loss_chunk_size: both replace the loss"):
        run_in_process(tiny_flags(assets, tmp_path / "both", tmp_path / "cache", "--use_liger_kernel",
                                  "--loss_chunk_size", 64))
