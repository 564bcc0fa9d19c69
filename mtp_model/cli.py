"""The `mtp` command line: `mtp <command> [options]`, the commands listed in COMMANDS (`mtp --help`).

Errors, the same for every command. Options and input files are checked before any model is loaded, so a
mistake costs seconds, not a model load: a bad value, a missing or malformed file is a usage error, one line
`mtp <command>: error: ...` naming the option, or the file and line, on stderr with exit code 2 (argparse's
convention; `ArgumentParser`, `bounded`, `model_dir` and `read_or_exit` are the shared pieces). An error
the library raises while a command runs (ValueError, OSError, RuntimeError: their messages are written for
users) is printed by `main` as the same one line with exit code 1; `MTP_TRACEBACK=1` shows the traceback.

`mtp demo` generates with stock greedy decoding and with MTP on the same model, checks that the texts are
identical, and prints tokens per step and tokens per second of both. It uses the project's shipped demo
model when the package has one (`mtp_model/demo_model/`), and otherwise a small Llama built from a config
with random weights, saying so.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from pathlib import Path

import torch

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"

# name: (module, function, what it does in one line for `mtp --help`)
COMMANDS = {
    "demo": ("mtp_model.cli", "demo", "stock greedy against multi-token generation on the shipped demo model"),
    "train": ("mtp_model.train_cli", "train_main", "train an MTP adapter for a local model on a JSONL file"),
    "eval": ("mtp_model.evaluate", "eval_main", "tokens per step and speed-up per domain of a model and its adapter"),
    "fetch": ("mtp_model.checkpoints", "fetch_main", "print the local directory of a known model, converting it once"),
    "convert-gguf": ("mtp_model.checkpoints", "convert_main", "convert a GGUF checkpoint to a float32 HF directory"),
    "build-adapter": ("mtp_model.recipes", "build_main", "build the adapter of a known model (distill, then train)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, its usage errors one line `<prog>: error: <message>` with exit code 2: the usage
    block argparse prints first would bury that line (`--help` shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def bounded(kind, low=None, high=None, low_open: bool = False):
    """An argparse `type`: a finite `kind` (int or float) in [low, high] ((low, high] with low_open); any
    other value is a usage error naming the option, e.g. `argument --steps: must be >= 1, got 0`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            if high is None:
                bounds = f"{'>' if low_open else '>='} {low}"
            else:
                bounds = f"in {'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def model_dir(text: str) -> Path:
    """An argparse `type`: a local Hugging Face model directory (one with a config.json)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a model directory (no config.json)")
    return path


def read_or_exit(parser: argparse.ArgumentParser, read, path, *args):
    """read(path, *args), or a usage error (exit 2) when the file is missing or unreadable, or when `read`
    refuses its content (a ValueError, whose message names the file and line)."""
    try:
        return read(path, *args)
    except OSError as error:
        parser.error(f"{path}: {error.strerror or error}")
    except ValueError as error:
        parser.error(str(error))


def bold(text: str) -> str:
    """`text` in bold on a terminal; unchanged when stdout is piped or NO_COLOR is set (no-color.org)."""
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[1m{text}\033[0m"
    return text


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
                print("  " + (prompt + bold(text)).replace("\n", "\n  ")[:600] + "\n")
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
    parser = ArgumentParser(prog="mtp demo", description=__doc__)
    parser.add_argument("--max-new-tokens", type=bounded(int, 1), default=96)
    parser.add_argument("--num-masks", type=bounded(int, 1), default=None,
                        help="default: the shipped adapter's generate default, or 4 with random weights")
    parser.add_argument("--decoding", choices=["quadratic", "linear"], default=None,
                        help="default: the shipped adapter's, or quadratic")
    parser.add_argument("--per-domain", type=bounded(int, 1), default=2)
    parser.add_argument("--seed", type=bounded(int, 0), default=0)
    parser.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.model_dir / "adapter" / "adapter_config.json").is_file():
        return _shipped_demo(args)
    args.num_masks = args.num_masks or 4
    args.decoding = args.decoding or "quadratic"
    return _random_demo(args)


def _overview() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: mtp <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "`mtp <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_overview())
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"usage: mtp <command> [options]\nmtp: error: {problem} (choose from {', '.join(COMMANDS)}; "
              f"`mtp --help` says what each does)", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    command = getattr(importlib.import_module(module), function)
    try:
        return command(argv[1:]) or 0
    except (ValueError, OSError, RuntimeError) as error:
        if os.environ.get("MTP_TRACEBACK"):
            raise
        print(f"mtp {argv[0]}: error: {error or type(error).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
