"""What the anchor fraction buys: the adapter's tokens per step against training compute, on the demo model.

    python benchmarks/measure_anchor_fraction.py --out benchmarks/results/anchor_fraction_demo_cpu.json

`mtp train --anchor-fraction F` puts mask blocks after a random F of the response tokens instead of after
every one (F = 1, the paper's layout): a step costs less, but teaches fewer blocks. For each fraction this
trains the demo model's adapter from scratch the way `mtp_model.demo.build` does (same self-distilled
pairs, seed, batch, rank and learning rate; fewer steps) and, every `--eval-every` steps, records the
training's CPU time and layout tokens so far and the adapter's tokens per step (8 masks, quadratic, greedy,
untimed) on held-out prompts. Comparing the curves at equal CPU time answers the question; CPU time, not
wall time, so that other work on the machine does not bend it (one torch thread).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback

from mtp_model.demo import corpus
from mtp_model.demo.build import DEFAULT_OUT, NUM_MASKS, distilled_examples, train_adapter
from mtp_model.training import MTPDataCollator


def tokens_per_step(model, tokenizer, prompts: list[str], max_new_tokens: int) -> float:
    """Tokens per decoding step over all prompts (each prompt alone, greedy, 8 masks, quadratic)."""
    tokens = steps = 0
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=max_new_tokens, num_masks=NUM_MASKS, decoding="quadratic")
            tokens += model.mtp_stats["tokens"]
            steps += model.mtp_stats["steps"]
    model.train()
    return tokens / steps


class Curve(TrainerCallback):
    """Every `every` steps: training CPU seconds and layout tokens so far, and held-out tokens per step."""

    def __init__(self, every: int, measure, layout_tokens):
        self.every, self.measure, self.layout_tokens, self.points = every, measure, layout_tokens, []
        self.cpu_seconds, self.since = 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.since is None:
            self.since = time.process_time()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        self.cpu_seconds += time.process_time() - self.since
        self.points.append({"step": state.global_step, "cpu_seconds": round(self.cpu_seconds, 1),
                            "layout_tokens": self.layout_tokens(), "tokens_per_step": round(self.measure(model), 4)})
        print(self.points[-1], flush=True)
        self.since = time.process_time()  # the measurement is not training compute


class CountingCollator(MTPDataCollator):
    """The training layout, counting every layout token the model trains on."""

    layout_tokens = 0

    def __call__(self, examples):
        batch = super().__call__(examples)
        self.layout_tokens += int(batch["valid"].sum())
        return batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.5, 0.25])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=1000, help="adapter-split prompts per domain")
    parser.add_argument("--heldout", type=int, default=5, help="held-out prompts per domain")
    parser.add_argument("--max-new-tokens", type=int, default=120)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_OUT)
    base = LlamaForCausalLM.from_pretrained(DEFAULT_OUT, dtype=torch.float32).eval()
    examples = distilled_examples(tokenizer, base, args.pairs)
    prompts = [prompt for domain in corpus.prompt_pairs("heldout", args.heldout).values() for prompt, _ in domain]
    runs = []
    for fraction in args.fractions:
        model = LlamaForCausalLM.from_pretrained(DEFAULT_OUT, dtype=torch.float32)
        collator = CountingCollator(NUM_MASKS, model.config.vocab_size, fraction)
        curve = Curve(args.eval_every, lambda m: tokens_per_step(m, tokenizer, prompts, args.max_new_tokens),
                      lambda: collator.layout_tokens)
        train_adapter(None, tokenizer, model, args.steps, examples=examples, data_collator=collator, callbacks=[curve])
        runs.append({"anchor_fraction": fraction, "points": curve.points})
    result = {
        "model": "mtp_model/demo_model", "masks": NUM_MASKS, "decoding": "quadratic", "steps": args.steps,
        "training_pairs": len(examples), "heldout_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": 1, "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
