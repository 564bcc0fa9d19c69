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


def _left_padded(prompts, pad_id):
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):  # left padding, as a tokenizer gives for generation
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def _shipped_demo(args) -> int:
    """Stock greedy against MTP on held-out prompts of the shipped model, one prompt at a time."""
    import json

    from transformers import AutoTokenizer, LlamaForCausalLM

    import mtp_model
    from mtp_model.data import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    mtp_model.patch(model, adapter=args.model_dir / "adapter")
    # Unless told otherwise, generate uses the adapter's defaults: `mtp eval --save-fastest` set them to
    # what ran fastest on a 2-core CPU, which need not be all k masks.
    records = [json.loads(line) for line in (args.model_dir / "heldout.jsonl").read_text().splitlines()]
    chosen = {}
    for record in records:  # the first prompts of each domain
        chosen.setdefault(record["domain"], [])
        if len(chosen[record["domain"]]) < args.per_domain:
            chosen[record["domain"]].append(record["prompt"])
    print(f"mtp demo: the shipped {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama "
          f"and its MTP adapter (k={model.mtp_config.num_masks}), held-out prompts, greedy decoding\n")
    totals = {"stock": [0, 0.0], "mtp": [0, 0.0, 0]}
    identical = True
    with torch.inference_mode():
        # One untimed generation of each first: MTP's first call packs the weights for oneDNN and merges the
        # LoRA (tens of milliseconds, once per model), which would otherwise be timed as decoding.
        warm_up = torch.tensor([prompt_ids(tokenizer, records[0]["prompt"])])
        type(model).generate(model, input_ids=warm_up, max_new_tokens=8, do_sample=False)
        model.generate(input_ids=warm_up, max_new_tokens=8, num_masks=args.num_masks, decoding=args.decoding)
        for domain, prompts in chosen.items():
            for prompt in prompts:
                ids = torch.tensor([prompt_ids(tokenizer, prompt)])
                stock, stock_seconds = _timed_generate(lambda **kw: type(model).generate(model, **kw), ids,
                                                       torch.ones_like(ids), args.max_new_tokens)
                ours, mtp_seconds = _timed_generate(
                    lambda **kw: model.generate(**kw, num_masks=args.num_masks, decoding=args.decoding), ids,
                    torch.ones_like(ids), args.max_new_tokens)
                same = torch.equal(stock, ours)
                identical &= same
                new = stock.shape[1] - ids.shape[1]
                totals["stock"][0] += new
                totals["stock"][1] += stock_seconds
                totals["mtp"][0] += new
                totals["mtp"][1] += mtp_seconds
                totals["mtp"][2] += model.mtp_stats["steps"]
                text = tokenizer.decode(ours[0, ids.shape[1] :], skip_special_tokens=True)
                print(f"[{domain}] {model.mtp_stats['tokens_per_step']:.2f} tokens/step, identical: {same}")
                print("  " + (prompt + "\033[1m" + text + "\033[0m").replace("\n", "\n  ")[:600] + "\n")
    stock_speed = totals["stock"][0] / totals["stock"][1]
    mtp_speed = totals["mtp"][0] / totals["mtp"][1]
    print(f"identical to stock greedy: {identical}")
    print(f"stock greedy: 1.00 tokens/step, {stock_speed:7.1f} tokens/s")
    print(f"MTP ({model.mtp_stats['num_masks']} masks, {model.mtp_stats['decoding']}): {totals['mtp'][0] / totals['mtp'][2]:.2f} tokens/step, "
          f"{mtp_speed:7.1f} tokens/s, speed-up x{mtp_speed / stock_speed:.2f}")
    return 0 if identical else 1


def _random_demo(args) -> int:
    import mtp_model

    print("mtp demo: no shipped demo model in this package yet.")
    print("Using a small Llama built from a config with RANDOM weights and a random adapter: the output is")
    print("gibberish, and the drafts are rarely right, so expect about 1 token per step. What it shows is the")
    print("mechanics: MTP generation returns exactly the tokens of stock greedy decoding.\n")
    model = _random_demo_model(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=generator) for n in (9, 5, 13)]
    input_ids, attention_mask = _left_padded(prompts, model.config.pad_token_id)
    with torch.inference_mode():
        stock, stock_seconds = _timed_generate(model.generate, input_ids, attention_mask, args.max_new_tokens)
        mtp_model.patch(model, mtp_model.MTPConfig(num_masks=args.num_masks, lora_rank=8, decoding=args.decoding))
        for module in model.modules():  # a random, non-zero adapter so the mask path differs from the base
            if isinstance(module, mtp_model.GatedLoRALinear):
                torch.nn.init.normal_(module.lora_B.weight, std=0.02, generator=generator)
        ours, mtp_seconds = _timed_generate(model.generate, input_ids, attention_mask, args.max_new_tokens)

    identical = torch.equal(stock, ours)
    new_tokens = stock.shape[0] * args.max_new_tokens
    for row in range(len(prompts)):
        print(f"row {row}: {stock[row, input_ids.shape[1]:].tolist()}")
    print(f"\nidentical to stock greedy: {identical}")
    print(f"stock greedy: 1.00 tokens/step, {new_tokens / stock_seconds:8.1f} tokens/s")
    print(f"MTP (k={args.num_masks}): {model.mtp_stats['tokens_per_step']:.2f} tokens/step, "
          f"{new_tokens / mtp_seconds:8.1f} tokens/s")
    return 0 if identical else 1


def demo(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtp demo", description=__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--num-masks", type=int, default=None,
                        help="default: the shipped adapter's generate default, or 4 with random weights")
    parser.add_argument("--decoding", choices=["quadratic", "linear"], default=None,
                        help="default: the shipped adapter's, or quadratic")
    parser.add_argument("--per-domain", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.model_dir / "adapter" / "adapter_config.json").is_file():
        return _shipped_demo(args)
    args.num_masks = args.num_masks or 4
    args.decoding = args.decoding or "quadratic"
    return _random_demo(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from mtp_model.checkpoints import convert_main, fetch_main
    from mtp_model.evaluate import eval_main
    from mtp_model.recipes import build_main
    from mtp_model.train_cli import train_main

    commands = {"demo": demo, "train": train_main, "eval": eval_main, "fetch": fetch_main,
                "convert-gguf": convert_main, "build-adapter": build_main}
    if not argv or argv[0] not in commands:
        print(f"usage: mtp {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
