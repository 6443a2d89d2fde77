"""Average K checkpoints into one Hugging Face model folder (a checkpoint soup), and optionally evaluate each input
and the average side by side.

    python -m pretrain.average_checkpoints --checkpoints OUT/checkpoint-400 OUT/checkpoint-500 OUT/checkpoint-600 \
        --output_dir SOUP [--evaluate]

It reads the checkpoints that a resume reads, whatever the launch that wrote them: one process and DDP
(model.safetensors), DeepSpeed ZeRO-2 and ZeRO-3 (each rank's shard of the fp32 master weights, consolidated as
DeepSpeed's zero_to_fp32 does). The mean is accumulated in fp32 and written in fp32 with save_pretrained, beside the
run's tokenizer and a soup.json that names the inputs. The model's config and tokenizer are those of the first
checkpoint's run (its run_config.json). --evaluate measures eval_loss, bits per byte and the run's --eval_tasks on
the run's held-out blocks (the evaluation the run logs) for every input and for the average.

It only reads checkpoints and the data cache; it must not write into a run's folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from pretrain.base.arguments import DataArguments, ModelArguments, TrainArguments, split_seed
from pretrain.base.errors import DataError, UsageError, exit_with, first_line
from pretrain.checkpointing.checkpoints import TRAINER_STATE, checkpoint_damage, checkpoint_step

logger = logging.getLogger("train_loop")
RUN_CONFIG = "run_config.json"  # what a run writes into its --output_dir at its start (telemetry.metrics)
SOUP = "soup.json"


def check_inputs(checkpoints: list[Path], output_dir: Path) -> None:
    """One line for what cannot be averaged, before any weights are read: fewer than two checkpoints, one given
    twice, a missing or incomplete one, one outside its run's folder, an output folder that holds files."""
    if len(checkpoints) < 2:
        raise UsageError(f"--checkpoints: {len(checkpoints)} given; an average needs at least 2")
    for checkpoint in checkpoints:
        if checkpoints.count(checkpoint) > 1:
            raise UsageError(f"--checkpoints: {checkpoint} is given twice; give each checkpoint once")
        if not checkpoint.is_dir():
            raise UsageError(f"--checkpoints: {checkpoint}: no such checkpoint folder")
        damage = checkpoint_damage(checkpoint)
        if damage:
            raise UsageError(f"--checkpoints: {checkpoint} is incomplete ({damage}); pick a complete checkpoint")
        if not (checkpoint.parent / RUN_CONFIG).is_file():
            raise UsageError(f"--checkpoints: {checkpoint} has no {RUN_CONFIG} beside it (the run writes it into its "
                             f"--output_dir); give checkpoints inside their run's folder")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UsageError(f"--output_dir {output_dir}: already holds files; give a new or empty folder")


def is_deepspeed(checkpoint: Path) -> bool:
    return json.loads((checkpoint / TRAINER_STATE).read_text()).get("distributed_type") == "DEEPSPEED"


def zero_folder(checkpoint: Path) -> Path:
    """The engine's folder inside a DeepSpeed checkpoint (Accelerate saves it under the tag in `latest`)."""
    return checkpoint / (checkpoint / "latest").read_text().strip()


def checkpoint_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Each saved weight's shape, read from the files' headers (no weights loaded)."""
    if is_deepspeed(checkpoint):
        states = sorted(zero_folder(checkpoint).glob("*model_states.pt"))[0]
        saved = torch.load(states, map_location="cpu", weights_only=False, mmap=True)
        return {name: tuple(shape) for group in saved["param_shapes"] for name, shape in group.items()}
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", "pt") as tensors:
        return {name: tuple(tensors.get_slice(name).get_shape()) for name in tensors.keys()}


def check_shapes(checkpoints: list[Path], model) -> None:
    """Every checkpoint holds the same weights, of the shapes of the model its run's config builds (a tied weight
    may be stored once)."""
    tied = tied_names(model)
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items() if name not in tied}
    first = untied(checkpoint_shapes(checkpoints[0]), tied)
    for checkpoint in checkpoints:
        shapes = first if checkpoint == checkpoints[0] else untied(checkpoint_shapes(checkpoint), tied)
        differ = sorted(set(shapes) ^ set(first)) or [name for name in shapes if shapes[name] != first[name]]
        if differ:
            name = differ[0]
            raise UsageError(f"--checkpoints: {checkpoints[0]} and {checkpoint} hold models of different shapes "
                             f"({name}: {list(first.get(name, ()))} against {list(shapes.get(name, ()))}); average "
                             f"checkpoints of one model")
    unfit = sorted(set(first) ^ set(expected)) or [name for name in first if first[name] != expected[name]]
    if unfit:
        raise UsageError(f"--checkpoints: {checkpoints[0]} does not fit the model of its run's {RUN_CONFIG} "
                         f"({unfit[0]}: {list(first.get(unfit[0], ()))} against {list(expected.get(unfit[0], ()))})")


def tied_names(model) -> set[str]:
    """The weights tied to another (the output head to the embedding): stored once by some layouts, twice by
    others, and read from the one they are tied to."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def untied(shapes: dict[str, tuple[int, ...]], tied: set[str]) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, shape in shapes.items() if name not in tied}


def checkpoint_weights(checkpoint: Path, tied: set[str]) -> dict[str, torch.Tensor]:
    """The weights a resume would train on, in fp32: the DeepSpeed ranks' fp32 master shards consolidated, or the
    saved model.safetensors of one process or DDP."""
    if is_deepspeed(checkpoint):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
            weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=zero_folder(checkpoint).name)
    else:
        from safetensors.torch import load_file

        weights = load_file(checkpoint / "model.safetensors")
    return {name: value.float() for name, value in weights.items() if name not in tied}


def average(checkpoints: list[Path], tied: set[str]) -> dict[str, torch.Tensor]:
    """The fp32 mean of the checkpoints' weights, one checkpoint in memory at a time beside the sum."""
    total: dict[str, torch.Tensor] = {}
    for checkpoint in checkpoints:
        for name, value in checkpoint_weights(checkpoint, tied).items():
            if name in total:
                total[name] += value
            else:
                total[name] = value.clone()
    return {name: value / len(checkpoints) for name, value in total.items()}


def run_arguments(checkpoint: Path) -> tuple[ModelArguments, DataArguments, TrainArguments, dict[str, Any]]:
    """The flags of the run that wrote the checkpoint (its run_config.json), and that record."""
    record = json.loads((checkpoint.parent / RUN_CONFIG).read_text())

    def build(kind, values: dict[str, Any]):
        names = {field.name for field in fields(kind) if field.init}
        return kind(**{key: value for key, value in values.items() if key in names})

    model_args, data_args = build(ModelArguments, record["model"]), build(DataArguments, record["data"])
    if not (model_args.model_name_or_path or model_args.config_name or model_args.tokenizer_name):
        data_args.train_files = None  # the demo, which records its own corpus: loading it finds its tokenizer again
    return model_args, data_args, build(TrainArguments, record["train"]), record


def load_model(model_args: ModelArguments, data_args: DataArguments):
    """The run's tokenizer and an fp32 model of its config (initialised; the weights are loaded into it)."""
    from transformers import AutoModelForCausalLM

    from pretrain.model.loading import build_config, load_config, load_tokenizer

    config = load_config(model_args)
    tokenizer = load_tokenizer(model_args, data_args, config)
    config = build_config(model_args, tokenizer, config)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    if model_args.attn_mask_type == "block_causal":
        from pretrain.data.document_mask import use_document_mask

        use_document_mask(model)
    return tokenizer, model.eval()


def set_weights(model, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= tied_names(model), \
        (missing, unexpected)  # check_shapes has refused anything else
    model.tie_weights()


def heldout_loader(tokenizer, model_args: ModelArguments, data_args: DataArguments, args: TrainArguments,
                   record: dict[str, Any]):
    """The held-out blocks each of the run's evaluations reads, from the run's data cache, in its batches."""
    from pretrain.data.corpus_cache import cache_site, load_cache
    from pretrain.data.document_mask import BlockCollator
    from pretrain.evaluation.heldout import eval_blocks

    if data_args.train_mixture:
        raise UsageError("--evaluate: the run trained on a --train_mixture, whose held-out sets this command does "
                         "not read yet; evaluate the soup with the loop's evaluation instead")
    site = cache_site(data_args, tokenizer, split_seed(args), "--train_files")
    packed = load_cache(site.directory)
    if packed is None or packed.validation is None:
        raise DataError(f"--evaluate: the run's data cache {site.directory} is gone or holds no held-out blocks; "
                        f"rebuild it with `python data_utils.py` and the run's data flags, or omit --evaluate")
    processes = record.get("num_processes", 1)
    global_batch = args.per_device_train_batch_size * processes * args.gradient_accumulation_steps
    blocks = eval_blocks(args, len(packed.validation), global_batch, len(packed.train) // global_batch, processes)
    block_causal = model_args.attn_mask_type == "block_causal"
    rows = torch.from_numpy(packed.validation[:blocks].astype("int64"))
    return torch.utils.data.DataLoader(rows, batch_size=args.per_device_eval_batch_size, shuffle=False,
                                       collate_fn=BlockCollator(tokenizer.eos_token_id if block_causal else None,
                                                                model_args.keep_boundary_targets))


def evaluate_side_by_side(checkpoints: list[Path], soup: dict[str, torch.Tensor], model, tokenizer,
                          model_args: ModelArguments, data_args: DataArguments, args: TrainArguments,
                          record: dict[str, Any]) -> dict[str, dict[str, float]]:
    """eval_loss, eval_bpb and the run's task scores of every checkpoint and of the average, by name."""
    from accelerate import Accelerator

    from pretrain.evaluation.heldout import evaluate, token_byte_lengths
    from pretrain.evaluation.tasks import load_tasks, score_tasks

    loader = heldout_loader(tokenizer, model_args, data_args, args, record)
    tasks = load_tasks(args.eval_tasks, args.eval_tasks_num_fewshot, tokenizer)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = model.to(accelerator.device)
    token_bytes = token_byte_lengths(tokenizer, model.config.vocab_size)
    found = {}
    with tempfile.TemporaryDirectory() as scratch:  # score_tasks' per-question files: not the soup's
        for checkpoint in [*checkpoints, None]:  # None: the average
            set_weights(model, soup if checkpoint is None else checkpoint_weights(checkpoint, tied_names(model)))
            name = "average" if checkpoint is None else f"{checkpoint.parent.name}/{checkpoint.name}"
            measured = evaluate(accelerator, model, loader, args.loss_chunk_size, token_bytes)
            if tasks:
                measured.update(score_tasks(accelerator, model, tasks, args.per_device_eval_batch_size,
                                            model.config.max_position_embeddings, scratch, 0))
            found[name] = measured
            logger.info(f"{name}: " + ", ".join(f"{key} {value:.4f}" for key, value in measured.items()))
    return found


def table(found: dict[str, dict[str, float]]) -> str:
    """The side-by-side evaluation as a Markdown table, the average's row last, with its change against the last
    checkpoint."""
    columns = [key for key in next(iter(found.values())) if key != "perplexity"]
    last = list(found)[-2]
    lines = [f"| model | {' | '.join(columns)} |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | {' | '.join(f'{values[key]:.4f}' for key in columns)} |" for name, values in found.items()]
    change = found["average"]["eval_loss"] / found[last]["eval_loss"] - 1
    return "\n".join(lines) + f"\n\naverage against {last}: eval_loss {change:+.2%}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m pretrain.average_checkpoints",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True,
                        help="checkpoint-N folders (two or more) of one model, as resume reads them")
    parser.add_argument("--output_dir", type=Path, required=True, help="a new folder for the averaged model")
    parser.add_argument("--evaluate", action="store_true",
                        help="also evaluate each checkpoint and the average on the run's held-out blocks and tasks")
    options = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    checkpoints = [path.absolute() for path in options.checkpoints]
    check_inputs(checkpoints, options.output_dir)
    model_args, data_args, args, record = run_arguments(checkpoints[0])
    tokenizer, model = load_model(model_args, data_args)
    check_shapes(checkpoints, model)
    soup = average(checkpoints, tied_names(model))
    set_weights(model, soup)
    model.config.torch_dtype = torch.float32
    model.save_pretrained(options.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(options.output_dir)
    summary: dict[str, Any] = {"checkpoints": [str(c) for c in checkpoints],
                               "steps": [checkpoint_step(c) for c in checkpoints], "accumulated_in": "float32"}
    logger.info(f"averaged {len(checkpoints)} checkpoints (steps {summary['steps']}) into {options.output_dir}")
    if options.evaluate:
        summary["evaluation"] = evaluate_side_by_side(checkpoints, soup, model, tokenizer, model_args, data_args,
                                                      args, record)
        print(table(summary["evaluation"]), flush=True)
    (options.output_dir / SOUP).write_text(json.dumps(summary, indent=1))
    return summary


def cli(argv: list[str] | None = None) -> None:
    """main() with the errors a user can fix as one line and exit status 1."""
    try:
        main(argv)
    except (UsageError, DataError) as error:
        exit_with(f"error: {error}", every_rank_has_it=True)
    except (OSError, RuntimeError) as error:  # an unreadable file under a complete manifest, a full disk
        exit_with(f"error: {first_line(error)}", every_rank_has_it=True)


if __name__ == "__main__":
    cli(sys.argv[1:])
