"""--optim muon: which parameters Muon trains, that its step is Muon's (not SGD's, not AdamW's), and that a run with
it resumes to the bit."""

import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_MODEL, checkpoint_estimate_error, launch, launch_env, read_metrics, run_in_process, \
    tiny_flags, weight_norms_by_part

from pretrain.base.arguments import TrainArguments
from pretrain.base.errors import UsageError
from pretrain.optim.optimizers import MuonWithAdamW, describe_split, parameter_groups
from pretrain.telemetry.layer_stats import KINDS

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Keller Jordan's Muon, torch's default


def tiny_model(vocabulary=96):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocabulary, **{**TINY_MODEL, "tie_word_embeddings": False}))


def muon_args(**changes):
    return TrainArguments(optim="muon", **changes)


def test_muon_takes_the_hidden_matrices_and_adamw_the_embedding_head_norms_and_biases():
    model = tiny_model()
    groups = parameter_groups(model, muon_args())
    names = {id(p): name for name, p in model.named_parameters()}
    muon = sorted(names[id(p)] for group in groups if group["muon"] for p in group["params"])
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert muon == sorted(f"model.layers.{layer}.{'self_attn' if kind.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{kind}.weight"
                          for layer in range(TINY_MODEL["num_hidden_layers"]) for kind in projections)
    adamw = {names[id(p)] for group in groups if not group["muon"] for p in group["params"]}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.self_attn.q_proj.bias"} <= adamw
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    decayed = [group for group in groups if not group["muon"] and group["weight_decay"] > 0]
    assert {names[id(p)] for p in decayed[0]["params"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert describe_split(groups).startswith("optimizer: Muon on the hidden matrices (14 tensors, ")
    assert [group["muon"] for group in parameter_groups(model, TrainArguments())] == [False, False]  # AdamW alone


def newton_schulz(matrix, steps=5):
    """Orthogonalize by the quintic iteration, written out from Muon's definition."""
    a, b, c = NS_COEFFICIENTS
    x = matrix / max(matrix.norm(), 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def test_a_step_is_muons_update_on_the_matrices_and_adamws_on_the_rest():
    """Against Muon written out from its definition (Nesterov momentum, Newton-Schulz, the update scaled to AdamW's
    RMS): torch runs the iteration in bf16 and the reference in fp32, so they agree to a quarter at most, where plain
    SGD or AdamW (whose first step is the gradient's sign) on the matrices would be off by more than half. The rest must be torch's AdamW."""
    model, reference = tiny_model(), tiny_model()
    lr, decay = 0.02, 0.1
    groups = parameter_groups(model, muon_args(learning_rate=lr, weight_decay=decay))
    optimizer = MuonWithAdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    names = {id(p): name for name, p in model.named_parameters()}
    muon, decayed, undecayed = ({names[id(p)] for p in group["params"]} for group in groups)
    by_name = dict(reference.named_parameters())
    adamw = torch.optim.AdamW([{"params": [by_name[n] for n in sorted(decayed)], "weight_decay": decay},
                               {"params": [by_name[n] for n in sorted(undecayed)], "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.95), eps=1e-8)
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 16))
    for net in (model, reference):
        net(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    adamw.step()
    for name in decayed | undecayed:
        torch.testing.assert_close(model.get_parameter(name), by_name[name], rtol=0, atol=1e-7, msg=name)
    for name in muon:
        before, gradient = by_name[name].detach(), by_name[name].grad
        taken = model.get_parameter(name).detach() - before * (1 - lr * decay)
        momentum = 0.05 * gradient  # torch's buffer.lerp_(grad, 1 - 0.95), from zero
        nesterov = 0.05 * gradient + 0.95 * momentum
        expected = -newton_schulz(nesterov) * lr * 0.2 * math.sqrt(max(before.shape))
        off = {how: ((step - expected).norm() / expected.norm()).item() for how, step in
               (("torch", taken), ("SGD", -lr * gradient), ("AdamW", -lr * gradient.sign()))}
        assert off["torch"] < 0.25 and off["SGD"] > 0.5 and off["AdamW"] > 0.5, (name, off)


def test_muons_state_round_trips_through_a_state_dict():
    model = tiny_model()
    optimizer = MuonWithAdamW(parameter_groups(model, muon_args()), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, 96, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    again = MuonWithAdamW(parameter_groups(model, muon_args()), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    again.load_state_dict(optimizer.state_dict())
    assert again.muon.state is again.state and again.muon.param_groups[0] is again.param_groups[0]
    buffers = [again.state[p]["momentum_buffer"] for p in again.muon.param_groups[0]["params"]]
    assert len(buffers) == 14 and all(b.abs().sum() > 0 for b in buffers)
    assert all("exp_avg" in again.state[p] for g in again.adamw.param_groups for p in g["params"])


def test_a_muon_run_calls_newton_schulz_once_per_matrix_and_step_and_resumes_to_the_bit(assets, tmp_path, monkeypatch,
                                                                                           capfd):
    import torch.optim._muon as torch_muon

    calls = []
    original = torch_muon._zeropower_via_newtonschulz
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz",
                        lambda grad, *rest: calls.append(tuple(grad.shape)) or original(grad, *rest))
    flags = tiny_flags(assets, tmp_path / "straight", tmp_path / "cache", "--train_files", assets["tiny"],
                       "--optim", "muon", "--max_steps", 6, "--save_steps", 3, "--validation_split_percentage", 0)
    run_in_process(flags)
    assert len(calls) == 6 * 14  # 7 projections in each of 2 layers, every step
    # The estimate before training counts Muon's one buffer per matrix, not AdamW's two.
    assert checkpoint_estimate_error(capfd.readouterr().err, tmp_path / "straight" / "checkpoint-3") < 0.1
    run_in_process(flags[:flags.index("--output_dir")] + ["--output_dir", str(tmp_path / "resumed"),
                                                         "--resume_from_checkpoint",
                                                         str(tmp_path / "straight" / "checkpoint-3")]
                   + flags[flags.index("--output_dir") + 2:])
    straight, _ = read_metrics(tmp_path / "straight")
    resumed, _ = read_metrics(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step]["loss"] == straight[step]["loss"], step
    with pytest.raises(UsageError, match="checkpoint-3 was trained with --optim muon and this run has --optim adamw; "
                                         "resume with --optim muon"):
        run_in_process(flags[:flags.index("--output_dir")] + ["--output_dir", str(tmp_path / "adamw"),
                                                             "--resume_from_checkpoint",
                                                             str(tmp_path / "straight" / "checkpoint-3")]
                       + flags[flags.index("--output_dir") + 2:] + ["--optim", "adamw"])


def test_zero2s_muon_update_is_torchs_step_on_the_whole_matrix(monkeypatch):
    """The update that replaces DeepSpeed's inside ZeRO-2 (which then applies weight decay and the learning rate, as
    its MuonWithAuxAdam does) gives exactly torch.optim.Muon's step, momentum included, over three steps."""
    from pretrain.optim.optimizers import torch_muon_update

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(48, 32))
    ours, momentum = weight.detach().clone(), torch.zeros(48, 32)
    lr, decay = 0.02, 0.1
    reference = torch.optim.Muon([weight], lr=lr, weight_decay=decay, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        gradient = torch.randn(48, 32)
        weight.grad = gradient.clone()
        reference.step()
        update = torch_muon_update(gradient.clone(), momentum, 0.95, ns_method="gram", is_expert_group=False)
        ours.mul_(1 - lr * decay).add_(update, alpha=-lr)  # DeepSpeed's MuonWithAuxAdam.step on a flat partition
        torch.testing.assert_close(ours, weight.detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(momentum, reference.state[weight]["momentum_buffer"], rtol=0, atol=0)


@pytest.mark.parametrize("config, error", [
    ({"zero_optimization": {"stage": 3}}, "--optim muon under DeepSpeed runs on ZeRO stage 2 "
                                          "(accelerate_configs/zero2.yaml), and this config has stage 3"),
    ({}, "and this config has stage 0: at stage 0 and 3"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Muon"}},
     "--optim muon builds its own optimizer, and the DeepSpeed config has an optimizer block of its own"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0},
     "--optim muon under DeepSpeed cannot clip the gradient (--max_grad_norm or the config's gradient_clipping: 1)"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}, "gradient_clipping: 0.5): ZeRO-2 measures"),
])
def test_muon_where_deepspeed_cannot_take_torchs_step_is_refused(config, error):
    """ZeRO-3 (zero.Init's flat parameters), stage 0 (no ZeRO optimizer to orthogonalize), DeepSpeed's own Muon
    block and a clip of the orthogonalized update are refused; ZeRO-2 without a clip, and AdamW anywhere, are not."""
    from pretrain.optim.optimizers import refuse_muon_where_deepspeed_differs

    with pytest.raises(UsageError, match=re.escape(error)):
        refuse_muon_where_deepspeed_differs(muon_args(max_grad_norm=0.5), config)
    refuse_muon_where_deepspeed_differs(TrainArguments(), config)
    refuse_muon_where_deepspeed_differs(muon_args(max_grad_norm=0.0), {"zero_optimization": {"stage": 2},
                                                                       "gradient_clipping": "auto"})


def test_muon_under_zero3_is_refused_in_one_line_before_any_work(assets, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_loop.py"),
                             *tiny_flags(assets, tmp_path / "out", tmp_path / "cache", "--max_steps", 1, "--optim",
                                         "muon", "--deepspeed", ROOT / "ds_config_zero3.json")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: --optim muon under DeepSpeed runs on ZeRO stage 2" in result.stderr
    assert not (tmp_path / "cache").exists()  # refused before the data was read


def per_layer_telemetry_under_muon(runs):
    """At step 5 of the Muon runs: on one process and DDP the per-layer gradient norms add up to the step's (1e-5);
    under ZeRO-2, whose partitions hold Muon's orthogonalized update by then, the parts with a Muon matrix have none,
    and the weight norms read from the partitions are those of checkpoint-5 (1e-6)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for layout in ("single", "ddp", "zero2"):
        record = read_metrics(runs / layout)[0][5]
        gradients = {key: value for key, value in record.items() if key.startswith(f"{KINDS[0]}/")}
        if layout != "zero2":
            assert math.sqrt(sum(v ** 2 for v in gradients.values())) == pytest.approx(record["grad_norm"], rel=1e-5)
            continue
        assert sorted(key for key, value in gradients.items() if value is None) == [
            f"{KINDS[0]}/layers.{i}.{kind}" for i in (0, 1) for kind in ("attn", "mlp")]
        weights = get_fp32_state_dict_from_zero_checkpoint(str(runs / layout / "checkpoint-5"))
        assert weight_norms_by_part(weights) == pytest.approx(
            {key: value for key, value in record.items() if key.startswith(f"{KINDS[3]}/")}, rel=1e-6)


@pytest.mark.slow
def test_one_process_ddp_and_zero2_take_the_same_muon_steps_and_zero2_resumes_exactly(assets, tmp_path):
    """One process x micro-batch 2 x accumulation 2 (torch's Muon) against ddp.yaml and zero2.yaml x 2 processes x
    micro-batch 2 (the same global batch): the same losses over 10 steps, so ZeRO-2 took torch's update on whole
    matrices (a shard's, DeepSpeed's own scaling, SGD or AdamW would not). ZeRO-2's checkpoint at step 5 resumes on
    2 processes to the bit, and on 1 process (through DeepSpeed's universal format) within 1e-5."""
    def argv(output, *layout):
        return tiny_flags(assets, output, tmp_path / "cache", "--train_files", assets["tiny"], "--optim", "muon",
                          "--max_grad_norm", 0, "--max_steps", 10, "--num_train_epochs", 2, "--save_steps", 5,
                          "--validation_split_percentage", 0, "--telemetry_steps", 5, *layout)

    run_in_process(argv(tmp_path / "single", "--gradient_accumulation_steps", 2))
    launch("ddp.yaml", 2, argv(tmp_path / "ddp"))
    log = launch("zero2.yaml", 2, argv(tmp_path / "zero2")).stderr
    assert "optimizer: Muon on the hidden matrices (14 tensors" in log and "DeepSpeed ZeRO-2" in log, log[-3000:]
    single, _ = read_metrics(tmp_path / "single")
    assert sorted(single) == list(range(1, 11))
    for layout in ("ddp", "zero2"):
        other, _ = read_metrics(tmp_path / layout)
        for step in single:
            assert other[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-5), (layout, step)
    per_layer_telemetry_under_muon(tmp_path)
    straight, _ = read_metrics(tmp_path / "zero2")
    launch("zero2.yaml", 2, argv(tmp_path / "resumed", "--resume_from_checkpoint",
                                 tmp_path / "zero2" / "checkpoint-5"))
    resumed, _ = read_metrics(tmp_path / "resumed")
    assert sorted(resumed) == list(range(6, 11))
    for step in resumed:
        assert resumed[step]["loss"] == straight[step]["loss"], step
    one = subprocess.run([sys.executable, str(ROOT / "train_loop.py"),
                          *map(str, argv(tmp_path / "on_one", "--gradient_accumulation_steps", 2,
                                         "--resume_from_checkpoint", tmp_path / "zero2" / "checkpoint-5",
                                         "--deepspeed", ROOT / "ds_config_zero2.json"))],
                         cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    on_one, _ = read_metrics(tmp_path / "on_one")
    assert sorted(on_one) == list(range(6, 11))
    for step in on_one:
        assert on_one[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5), step
