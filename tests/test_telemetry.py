"""Per-layer telemetry (--telemetry_steps): the largest attention logit against a brute force over the positions the
masks allow, the update norms against two checkpoints, and losses that telemetry leaves bitwise alone. The layouts
(one process, DDP, ZeRO-2, ZeRO-3, Muon under ZeRO-2) and the collectives it adds ride on the launches of
test_distributed.py and test_optimizers.py."""

import json
import math

import pytest
import torch

from conftest import TINY_MODEL, read_metrics, run_in_process, tiny_flags

from pretrain.data.document_mask import document_positions
from pretrain.telemetry.layer_stats import KINDS, LOGIT, part_of, watch_attention


def tiny_model(attention="eager"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, **TINY_MODEL, use_cache=False, attn_implementation=attention)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # weights large enough that the largest logit stands out from rounding
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.q_proj.bias.normal_()
    return model


def watched_logits(model, batch):
    """Each layer's largest logit as the telemetry hooks measure it in a forward."""
    attentions = [layer.self_attn for layer in model.model.layers]
    logits = torch.full((len(attentions),), -math.inf)
    hooks = [hook for index, attention in enumerate(attentions) for hook in watch_attention(attention, logits, index)]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    return logits


def brute_force_logits(model, batch, monkeypatch):
    """Each layer's largest q.k x scaling over every allowed (query, key) pair, from the q and k (after RoPE) that
    eager attention receives and the mask that transformers builds for it (0 where a key is allowed)."""
    from transformers.models.qwen2 import modeling_qwen2

    seen = []
    original = modeling_qwen2.eager_attention_forward

    def capture(module, query, key, value, attention_mask, scaling, **kwargs):
        seen.append((query, key, attention_mask, scaling))
        return original(module, query, key, value, attention_mask, scaling, **kwargs)

    monkeypatch.setattr(modeling_qwen2, "eager_attention_forward", capture)
    with torch.no_grad():
        model(**batch)
    monkeypatch.undo()
    largest = []
    for query, key, mask, scaling in seen:  # every (query, key) pair's product, then the allowed ones' largest
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        products = torch.einsum("bhid,bhjd->bhij", query, key) * scaling
        length = query.shape[2]
        allowed = torch.ones(length, length).tril().bool()[None, None] if mask is None else mask == 0
        largest.append(float(products.masked_select(allowed.expand_as(products)).max()))
    return torch.tensor(largest)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "block_causal"])
def test_the_largest_logit_is_a_brute_force_maximum_over_the_allowed_positions(masked, monkeypatch):
    """Packed documents (EOS = 1): with restarting positions the largest logit is taken within each document only,
    and differs from the causal one over the same tokens."""
    model = tiny_model()
    ids = torch.randint(2, 40, (2, 24), generator=torch.Generator().manual_seed(1))
    ids[0, [5, 13]] = 1
    ids[1, 9] = 1
    batch = {"input_ids": ids}
    if masked:
        batch["position_ids"] = document_positions(ids, 1)
    watched = watched_logits(model, batch)
    assert watched.tolist() == pytest.approx(brute_force_logits(model, batch, monkeypatch).tolist(), rel=1e-5)
    if masked:
        assert not torch.allclose(watched, watched_logits(model, {"input_ids": ids}))


def test_scaling_q_proj_by_4_scales_the_largest_logit_by_4():
    model = tiny_model("sdpa")
    ids = torch.randint(2, 40, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.zero_()
    before = watched_logits(model, {"input_ids": ids})
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(4)  # layer 1 only: layer 0's inputs stay the same
    after = watched_logits(model, {"input_ids": ids})
    assert after[0] == pytest.approx(float(before[0]), rel=1e-6)
    assert after[1] == pytest.approx(4 * float(before[1]), rel=1e-5)


def parts_norms(path):
    """Each part's weight tensors of a checkpoint (one process: model.safetensors), by the telemetry's part names."""
    from safetensors.torch import load_file

    weights = load_file(path / "model.safetensors")
    parts = {}
    for name, tensor in weights.items():
        parts.setdefault(part_of(name, 1), []).append(tensor)
    return parts


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_update_norms_are_the_weights_difference_between_two_checkpoints_and_losses_are_bitwise_unchanged(
        assets, tmp_path, optim):
    """Telemetry on every step of 3, saved at every step: at step 3 each part's update norm is the norm of
    checkpoint-3's weights minus checkpoint-2's (1e-6), for AdamW's parameters and, under --optim muon, for Muon's
    matrices and AdamW's embedding, norms and biases; the weight norms are checkpoint-3's. The AdamW run masks
    attention at documents (the hooks see restarting positions). Its losses are bitwise those of the same run
    with telemetry off."""
    extra = ["--optim", optim] + (["--attn_mask_type", "block_causal"] if optim == "adamw" else [])

    def flags(name, *more):
        return tiny_flags(assets, tmp_path / name, tmp_path / "cache", "--train_files", assets["tiny"], "--max_steps",
                          3, "--gradient_accumulation_steps", 2, "--validation_split_percentage", 0, *extra, *more)

    run_in_process(flags("on", "--telemetry_steps", 1, "--save_steps", 1))
    records, _ = read_metrics(tmp_path / "on")
    before, after = parts_norms(tmp_path / "on" / "checkpoint-2"), parts_norms(tmp_path / "on" / "checkpoint-3")
    assert set(before) == {"embed", "norm"} | {f"layers.{i}.{k}" for i in (0, 1) for k in ("attn", "mlp", "norms")}
    for part in before:
        update = math.sqrt(sum(float((new - old).double().square().sum()) for new, old in zip(after[part],
                                                                                             before[part])))
        weights = math.sqrt(sum(float(new.double().square().sum()) for new in after[part]))
        assert records[3][f"{KINDS[1]}/{part}"] == pytest.approx(update, rel=1e-6), part
        assert records[3][f"{KINDS[3]}/{part}"] == pytest.approx(weights, rel=1e-6), part
        assert update > 0
    assert all(records[step][f"{LOGIT}/layers.1"] > 0 for step in (1, 2, 3))
    if optim == "muon":
        return
    run_in_process(flags("off", "--telemetry_steps", 0))
    off, _ = read_metrics(tmp_path / "off")
    assert [off[step]["loss"] for step in (1, 2, 3)] == [records[step]["loss"] for step in (1, 2, 3)]
    assert not any("/" in key for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()
                   for key in json.loads(line))
