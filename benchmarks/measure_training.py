"""Training cost of an MTP adapter on a real model: layout tokens per second and peak memory per layout.

    python benchmarks/measure_training.py --model smollm2-135m-instruct --out benchmarks/results/smollm2_training_cpu.json

Each configuration runs in its own process (peak resident memory is per process): a batch of `--batch`
sequences of `--length` tokens (a fifth prompt, the rest response, random ids), k masks, one warm-up step
and `--steps` timed steps of loss + backward (no optimizer: the trainable parameters are a few MB).
Configurations: anchor fraction (masks after every response token, the paper's layout, or a random
subset), regular rows in the loss or not, activation checkpointing on or off.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [  # (anchor fraction, regular weight, checkpointing)
    (0.25, 0.0, False),
    (0.25, 0.0, True),
    (0.5, 0.0, True),
    (1.0, 0.0, True),
    (1.0, 1.0, True),
]


def measure(model_name, fraction, regular, checkpointing, batch, length, num_masks, steps) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import mtp_model
    from mtp_model.checkpoints import model_directory
    from mtp_model.training import LossWeights, MTPDataCollator, enable_gradient_checkpointing, mtp_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_directory(model_name), dtype=torch.float32)
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=num_masks))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    examples = [{"input_ids": torch.randint(0, vocab, (length,), generator=generator),
                 "loss_mask": torch.arange(length) >= length // 5} for _ in range(batch)]
    collate = MTPDataCollator(num_masks, vocab, fraction)
    seconds, tokens = [], []
    for step in range(steps + 1):
        inputs = collate(examples)
        start = time.perf_counter()
        loss, _ = mtp_loss(model, inputs, LossWeights(regular=regular))
        loss.backward()
        if step:  # the first step warms up
            seconds.append(time.perf_counter() - start)
            tokens.append(int(inputs["valid"].sum()))
    return {"anchor_fraction": fraction, "regular_weight": regular, "checkpointing": checkpointing,
            "batch": batch, "length": length, "num_masks": num_masks, "layout_tokens": sum(tokens) / len(tokens),
            "seconds_per_step": sorted(seconds)[len(seconds) // 2],
            "layout_tokens_per_second": sum(tokens) / sum(seconds),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--num-masks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # fraction regular checkpointing, in a child
    args = parser.parse_args()
    if args.one:
        fraction, regular, checkpointing = float(args.one[0]), float(args.one[1]), args.one[2] == "1"
        print(json.dumps(measure(args.model, fraction, regular, checkpointing, args.batch, args.length,
                                 args.num_masks, args.steps)))
        return 0
    results = []
    for fraction, regular, checkpointing in CONFIGS:
        command = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--length",
                   str(args.length), "--num-masks", str(args.num_masks), "--steps", str(args.steps),
                   "--one", str(fraction), str(regular), "1" if checkpointing else "0"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            result = {"anchor_fraction": fraction, "regular_weight": regular, "checkpointing": checkpointing,
                      "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
        else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        import torch

        args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                        "command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
