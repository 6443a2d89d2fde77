"""--attn_mask_type block_causal: each document of a packed block has, token for token, the losses it has alone, in
every way the loop can compute them (eager, sdpa, gradient checkpointing, loss in chunks, compiled layers,
evaluation), and nothing can silently turn the mask off."""

import pytest
import torch
from conftest import tiny_flags
from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

import train_loop
from pretrain.base.arguments import parse_args
from pretrain.base.errors import UsageError
from pretrain.data.document_mask import BlockCollator, boundary_labels, document_positions, use_document_mask
from pretrain.evaluation import heldout

EOS = 0  # the demo tokenizer's <|endoftext|>
DOCUMENTS = [[11, 12, 13, 14, 15, 16, EOS], [21, 22, 23, 24, 25, EOS], [31, 32, 33, 34, 35, 36, 37, 38]]
# The third document continues past the block: its tail would be in the next one.


def test_positions_restart_and_the_boundary_target_is_left_out():
    ids = torch.tensor([[3, 4, EOS, 5, 6, 7, EOS, 8]])
    assert document_positions(ids, EOS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert boundary_labels(ids, EOS).tolist() == [[3, 4, EOS, -100, 6, 7, EOS, -100]]
    batch = BlockCollator(EOS, keep_boundary_targets=True)(ids)
    assert torch.equal(batch["labels"], ids) and "position_ids" in batch
    assert BlockCollator()(ids).keys() == {"input_ids", "labels"}


def build(assets, tmp_path, *extra):
    """The model as a run builds it (config, attention kernel, mask check, checkpointing, chunks, compile), fp32."""
    model_args, _, args = parse_args(tiny_flags(assets, tmp_path, tmp_path, "--attn_mask_type", "block_causal",
                                                *extra))
    config = AutoConfig.from_pretrained(assets["config"])
    assert config.use_cache  # the model's own default: it would skip the mask in training if left on
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    return train_loop.build_model(model_args, config, tokenizer, args)


def alone_losses(model, document):
    """Per-token next-token losses of one document by itself (positions from 0, nothing before it)."""
    ids = torch.tensor([document])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]  # no labels: the model's own forward, chunked or not
    return torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="none")


def packed_batch():
    return BlockCollator(EOS)(torch.tensor([sum(DOCUMENTS, [])]))


@pytest.mark.parametrize("extra", [["--attn_implementation", "eager"], ["--attn_implementation", "sdpa"],
                                   ["--gradient_checkpointing"],
                                   ["--torch_compile", "--torch_compile_backend", "aot_eager"]],
                         ids=["eager", "sdpa", "checkpointing", "compiled"])
def test_each_packed_document_has_its_losses_alone(assets, tmp_path, extra):
    model = build(assets, tmp_path, *extra)
    assert model.config.use_cache is False
    model.train()  # as in training: checkpointing recomputes only in train mode
    batch = packed_batch()
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, :-1]
    packed = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][0, 1:], reduction="none")
    start = 0
    for document in DOCUMENTS:
        end = start + len(document)
        torch.testing.assert_close(packed[start:end - 1].detach(), alone_losses(model, document), atol=1e-5, rtol=0)
        if end < len(packed) + 1:
            assert packed[end - 1] == 0  # the EOS's prediction of the next document's first token: not counted
        start = end
    # The training loss is the mean over the counted targets: every document's tokens, no boundary.
    expected = torch.cat([alone_losses(model, document) for document in DOCUMENTS]).mean()
    torch.testing.assert_close(model(**batch).loss.detach(), expected, atol=1e-5, rtol=0)


def test_the_loss_in_chunks_and_evaluation_use_the_mask(assets, tmp_path):
    model = build(assets, tmp_path, "--loss_chunk_size", 5)
    batch = packed_batch()
    expected = torch.cat([alone_losses(model, document) for document in DOCUMENTS]).mean()
    torch.testing.assert_close(model(**batch).loss.detach(), expected, atol=1e-5, rtol=0)

    class Plain:  # evaluation's own path, chunked and not
        device = "cpu"

        @staticmethod
        def autocast():
            return torch.autocast("cpu", enabled=False)

        @staticmethod
        def unwrap_model(wrapped):
            return wrapped

    with torch.no_grad():
        for chunk in (0, 5):
            token_losses = heldout.eval_token_losses(Plain, model, batch, chunk)
            counted = batch["labels"][:, 1:] != -100
            torch.testing.assert_close(token_losses[0].sum() / counted[0].sum(), expected, atol=1e-5, rtol=0)


def test_use_cache_cannot_silently_turn_the_mask_off(assets, tmp_path):
    """What the guard prevents: with a training cache, transformers skips the packed-sequence detection."""
    model = build(assets, tmp_path, "--attn_implementation", "sdpa")
    batch = packed_batch()
    with torch.no_grad():
        guarded = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        unguarded = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
    second = slice(len(DOCUMENTS[0]), len(DOCUMENTS[0]) + len(DOCUMENTS[1]))
    assert not torch.allclose(guarded[0, second], unguarded[0, second], atol=1e-3)  # the trap is real
    torch.testing.assert_close(
        torch.nn.functional.cross_entropy(guarded[0, second][:-1], batch["input_ids"][0, second][1:],
                                          reduction="none"), alone_losses(model, DOCUMENTS[1]), atol=1e-5, rtol=0)


def test_a_model_that_ignores_the_mask_is_refused_in_one_line(assets):
    class IgnoresPositions(Qwen2ForCausalLM):
        def forward(self, *args, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    model = IgnoresPositions(AutoConfig.from_pretrained(assets["config"]))
    with pytest.raises(UsageError, match=r"^--attn_mask_type block_causal: IgnoresPositions with sdpa attention "
                                         r"attends across documents even with restarting position_ids; use "):
        use_document_mask(model)
