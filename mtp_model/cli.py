"""The `mtp` command line: `mtp demo`, `mtp train ...` (`train_cli.py`), `mtp eval ...` (`evaluate.py`).

`mtp demo` generates with stock greedy decoding and with MTP on the same model, checks that the texts are
identical, and prints tokens per step and tokens per second of both. It uses the project's shipped demo
model when the package has one (`mtp_model/demo_model/`), and otherwise a small Llama built from a config
with random weights, saying so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def _random_demo_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _timed_generate(generate, input_ids, attention_mask, max_new_tokens):
    start = time.perf_counter()
    output = generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return output, time.perf_counter() - start


def demo(argv: list[str] | None = None) -> int:
    import mtp_model

    parser = argparse.ArgumentParser(prog="mtp demo", description=__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--num-masks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("mtp demo: no shipped demo model in this package yet.")
    print("Using a small Llama built from a config with RANDOM weights and a random adapter: the output is")
    print("gibberish, and the drafts are rarely right, so expect about 1 token per step. What it shows is the")
    print("mechanics: MTP generation returns exactly the tokens of stock greedy decoding.\n")
    model = _random_demo_model(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=generator) for n in (9, 5, 13)]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), model.config.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):  # left padding, as a tokenizer gives for generation
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1

    with torch.inference_mode():
        stock, stock_seconds = _timed_generate(model.generate, input_ids, attention_mask, args.max_new_tokens)
        mtp_model.patch(model, mtp_model.MTPConfig(num_masks=args.num_masks, lora_rank=8))
        for module in model.modules():  # a random, non-zero adapter so the mask path differs from the base
            if isinstance(module, mtp_model.GatedLoRALinear):
                torch.nn.init.normal_(module.lora_B.weight, std=0.02, generator=generator)
        ours, mtp_seconds = _timed_generate(model.generate, input_ids, attention_mask, args.max_new_tokens)

    stats = model.mtp_stats
    identical = torch.equal(stock, ours)
    new_tokens = stock.shape[0] * args.max_new_tokens
    for row in range(len(prompts)):
        print(f"row {row}: {stock[row, width:].tolist()}")
    print(f"\nidentical to stock greedy: {identical}")
    print(f"stock greedy: 1.00 tokens/step, {new_tokens / stock_seconds:8.1f} tokens/s")
    print(f"MTP (k={args.num_masks}): {stats['tokens_per_step']:.2f} tokens/step, {new_tokens / mtp_seconds:8.1f} tokens/s")
    return 0 if identical else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from mtp_model.evaluate import eval_main
    from mtp_model.train_cli import train_main

    commands = {"demo": demo, "train": train_main, "eval": eval_main}
    if not argv or argv[0] not in commands:
        print(f"usage: mtp {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
