"""How much slower bf16 matmuls run than fp32 on a CPU without native bf16, at Qwen2.5-1.5B's widths.

oneDNN capped at AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`) stands in for a CPU without AVX-512 BF16 or AMX, where it
emulates bf16. Each row runs in a fresh process per side (native, emulated); a time is the fastest of the rounds,
fp32 and bf16 interleaved so that a burst of load hits both. The figures back the range that `--bf16`'s warning
gives on such a CPU (pretrain/distributed/launch.py: EMULATED_BF16_SLOWDOWN), which does no timing of its own.

    python bench/bf16_emulation.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# (tokens, in, out): a micro-batch's rows against Qwen2.5-1.5B's projections (hidden 1536, MLP 8960), and smaller
SHAPES = [(32, 512, 1024), (64, 1536, 1536), (64, 1536, 8960), (256, 1536, 8960)]

MEASURE = """
import json, sys, time, torch
rounds = int(sys.argv[1])
def fastest(a, b):
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - start)
    return best
rows = []
for m, k, n in json.loads(sys.argv[2]):
    x, w = torch.randn(m, k), torch.randn(k, n)
    xb, wb = x.bfloat16(), w.bfloat16()
    x @ w; xb @ wb  # first calls pick kernels
    fp32, bf16 = fastest(x, w), fastest(xb, wb)
    rows.append({"shape": [m, k, n], "fp32_ms": fp32 * 1e3, "bf16_ms": bf16 * 1e3})
print(json.dumps({"native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "rows": rows}))
"""


def measure(rounds: int, cap: str | None) -> dict:
    env = dict(os.environ, **({"ONEDNN_MAX_CPU_ISA": cap} if cap else {}))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(rounds), json.dumps(SHAPES)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per side and shape (the fastest counts)")
    options = parser.parse_args()
    sides = {"this CPU as it is": measure(options.rounds, None), "oneDNN capped at AVX2": measure(options.rounds, "AVX2")}
    print("| oneDNN | bf16 native (oneDNN says) | matmul (tokens x in x out) | fp32 ms | bf16 ms | bf16 / fp32 |")
    print("|---|---|---|---:|---:|---:|")
    for side, result in sides.items():
        for row in result["rows"]:
            print(f"| {side} | {'yes' if result['native'] else 'no'} | {' x '.join(map(str, row['shape']))} | "
                  f"{row['fp32_ms']:.2f} | {row['bf16_ms']:.2f} | {row['bf16_ms'] / row['fp32_ms']:.1f}x |")


if __name__ == "__main__":
    main()
