"""Tokens/s of a training step (forward and backward) with attention masked at documents (--attn_mask_type
block_causal) against the plain causal mask, on the real case's shape: Qwen's 151,936-entry vocabulary, blocks of
2048 tokens holding several documents (lengths drawn like Chinese web pages, 200-1,500 tokens), a 2-layer Qwen2 in
fp32 on the CPU. The model is built as train_loop.py builds it (mask check, loss in chunks). Rows run interleaved
over --rounds; the table gives medians and each row's ratio to causal sdpa.

    python bench/document_mask.py                 # --rounds 5 --steps 3 --batch 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_loop  # noqa: E402
from pretrain.base.arguments import parse_args  # noqa: E402
from pretrain.data.document_mask import BlockCollator  # noqa: E402

VOCAB, BLOCK, EOS = 151_936, 2048, 151_643  # Qwen2.5's vocabulary and <|endoftext|>
ROWS = [("causal", "sdpa"), ("block_causal", "sdpa"), ("causal", "eager"), ("block_causal", "eager")]


def packed_blocks(batch: int, seed: int) -> torch.Tensor:
    """Blocks of random ids with an EOS after documents of 200-1,500 tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, EOS, (batch, BLOCK), generator=generator)
    for row in ids:
        position = int(torch.randint(0, 1500, (1,), generator=generator))  # the block starts mid-document
        while position < BLOCK:
            row[position] = EOS
            position += int(torch.randint(200, 1501, (1,), generator=generator))
    return ids


def build(mask: str, attention: str, folder: Path):
    config = folder / "config.json"
    if not config.exists():
        from transformers import Qwen2Config

        Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=BLOCK,
                    tie_word_embeddings=True, eos_token_id=EOS).save_pretrained(folder)
    model_args, _, args = parse_args(["--config_name", str(folder), "--train_files", "unused.jsonl",
                                      "--attn_mask_type", mask, "--attn_implementation", attention,
                                      "--loss_chunk_size", "4096", "--report_to", "none"])
    from transformers import AutoConfig

    class NoTokenizer:  # build_model reads the vocabulary size only through the config here
        def __len__(self):
            return VOCAB

    model = train_loop.build_model(model_args, AutoConfig.from_pretrained(folder, attn_implementation=attention),
                                   NoTokenizer(), args)
    return model.train()


def step_seconds(model, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    options = parser.parse_args()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp()) / "config"
    models = {row: build(*row, folder) for row in ROWS}
    ids = packed_blocks(options.batch, seed=1)
    batches = {"causal": BlockCollator()(ids), "block_causal": BlockCollator(EOS)(ids)}
    for (mask, _), model in models.items():  # warm-up: allocator growth and first-call costs
        step_seconds(model, batches[mask])
    times: dict[tuple[str, str], list[float]] = {row: [] for row in ROWS}
    for round_index in range(options.rounds):
        for row in ROWS[round_index % len(ROWS):] + ROWS[:round_index % len(ROWS)]:  # rotated order
            times[row].append(statistics.median(step_seconds(models[row], batches[row[0]])
                                                for _ in range(options.steps)))
    tokens = options.batch * BLOCK
    base = tokens / statistics.median(times[("causal", "sdpa")])
    documents = int((ids == EOS).sum()) + options.batch
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{options.batch} blocks of {BLOCK} tokens, about {documents} documents, vocabulary {VOCAB:,}, "
          f"2 layers x 256 wide, fp32, loss in chunks of 4096; median of {options.rounds} rounds x "
          f"{options.steps} steps")
    print("| mask | attention | tokens/s | vs causal sdpa | spread over rounds |")
    print("|---|---|---:|---:|---|")
    for row in ROWS:
        rates = [tokens / seconds for seconds in times[row]]
        median = statistics.median(rates)
        print(f"| {row[0]} | {row[1]} | {median:,.0f} | {median / base:.2f}x | "
              f"{min(rates):,.0f}-{max(rates):,.0f} |")


if __name__ == "__main__":
    main()
