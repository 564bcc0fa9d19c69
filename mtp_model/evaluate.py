"""`mtp eval`: the paper's Table 1 for any patched model and any JSONL of prompts.

For every domain of the prompt file (`{"prompt": ..., "domain": ...}` per line; chat `messages` work too)
it measures tokens per step, greedy, up to `max_steps` forward passes per prompt (the paper uses 100):
- for 1..k masks with the sampler, in quadratic decoding (the paper's table) and in linear decoding;
- at k masks without the sampler, both modes (the rest of the paper's ablation);
- wall-clock tokens per second at batch 1, stock greedy against every (masks, mode) measured, so the
  fastest configuration on this machine is reported next to the highest tokens per step. Where a step's
  cost grows with the tokens it feeds (a CPU), linear decoding's 2k+1 tokens a step can beat quadratic's
  (k+1)^2 and fewer masks can beat more: both sweeps are there so that `--save-fastest` picks from all
  of them. After one untimed warm-up, each generation (MTP and its stock twin) is timed `repeats` times
  and the fastest run counts: on a small shared machine single timings swing by 20%, more than the gaps
  being ranked.
Every MTP output is checked against stock greedy decoding on the same prompt (`identical` in the JSON).
Results are printed as a table, written as JSON and, with matplotlib installed, drawn as a PNG chart.
The options, the prompt file and the adapter's config are checked before the model is loaded (`cli.py`
has the error conventions).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from mtp_model.cli import ArgumentParser, bounded, model_dir, read_or_exit
from mtp_model.data import iter_jsonl, prompt_ids

MODES = ("quadratic", "linear")


def read_prompts(path: str | Path, per_domain: int | None = None) -> list[tuple[str, object]]:
    """(domain, prompt) pairs, the first `per_domain` of each domain (default: all); errors name the line."""
    prompts = []
    for number, record in iter_jsonl(path):
        prompt = record.get("messages", record.get("prompt")) if isinstance(record, dict) else None
        if isinstance(prompt, list):
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
                raise ValueError(f"{path}:{number}: every message needs 'role' and 'content'")
            prompt = prompt if prompt and prompt[-1]["role"] != "assistant" else prompt[:-1]
        if not prompt or not isinstance(prompt, (str, list)):
            raise ValueError(f"{path}:{number}: expected a 'prompt' string or a 'messages' list")
        prompts.append((str(record.get("domain", "all")), prompt))
    if per_domain is not None:
        kept, seen = [], defaultdict(int)
        for domain, prompt in prompts:
            seen[domain] += 1
            if seen[domain] <= per_domain:
                kept.append((domain, prompt))
        prompts = kept
    return prompts


def _generate(model, ids, stock: bool, repeats: int = 1, **options):
    """(output, fastest of `repeats` timed runs in seconds); greedy, so every run gives the same output."""
    mask = torch.ones_like(ids)
    generate = (lambda **kw: type(model).generate(model, **kw)) if stock else model.generate
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(input_ids=ids, attention_mask=mask, do_sample=False, **options)
        fastest = min(fastest, time.perf_counter() - start)
    return out, fastest


def evaluate(model, tokenizer, prompts, max_steps: int = 100, max_masks: int | None = None, repeats: int = 2) -> dict:
    """Runs every measurement on a patched model; returns the results as a JSON-ready dict."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    k = max_masks or model.mtp_config.num_masks
    device = model.get_input_embeddings().weight.device
    budget = max_steps * (k + 1)
    configs = [(j, mode, True) for mode in MODES for j in range(1, k + 1)]
    configs += [(k, mode, False) for mode in MODES]
    tokens, steps, seconds = defaultdict(int), defaultdict(int), defaultdict(float)
    identical = True
    with torch.inference_mode():
        if prompts:  # warm-up: first-call costs (allocator, lazy init) stay out of the timings
            ids = torch.tensor([prompt_ids(tokenizer, prompts[0][1])], device=device)
            _generate(model, ids, False, max_new_tokens=k + 1, max_steps=1)
            _generate(model, ids, True, max_new_tokens=1)
        for domain, prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
            for j, mode, sampler in configs:
                out, elapsed = _generate(model, ids, False, repeats, max_new_tokens=budget, max_steps=max_steps,
                                         num_masks=j, decoding=mode, use_sampler=sampler)
                stats = model.mtp_stats
                key = (domain, j, mode, sampler)
                tokens[key] += stats["tokens"]
                steps[key] += stats["steps"]
                seconds[key] += elapsed
                # Stock greedy for exactly as many tokens: the same text, or MTP is broken.
                reference, stock_seconds = _generate(model, ids, True, repeats, max_new_tokens=stats["tokens"],
                                                     min_new_tokens=0)
                identical &= torch.equal(out, reference[:, : out.shape[1]])
                tokens[(domain, "stock")] += stats["tokens"]
                seconds[(domain, "stock")] += stock_seconds
    return _summarise(configs, tokens, steps, seconds, sorted({d for d, _ in prompts}), identical, max_steps)


def _summarise(configs, tokens, steps, seconds, domains, identical, max_steps) -> dict:
    def total(counter, domain, *config):  # domain None: every domain together
        return sum(value for key, value in counter.items() if key[1:] == config and domain in (None, key[0]))

    def summary(domain):
        stock_speed = total(tokens, domain, "stock") / max(total(seconds, domain, "stock"), 1e-9)
        rows = []
        for config in configs:
            speed = total(tokens, domain, *config) / max(total(seconds, domain, *config), 1e-9)
            rows.append({"num_masks": config[0], "decoding": config[1], "sampler": config[2],
                         "tokens_per_step": round(total(tokens, domain, *config) / max(total(steps, domain, *config), 1), 3),
                         "tokens_per_second": round(speed, 1), "speedup": round(speed / stock_speed, 3)})
        return {"stock_tokens_per_second": round(stock_speed, 1), "runs": rows,
                "fastest": max(rows, key=lambda r: r["tokens_per_second"])}

    return {"max_steps": max_steps, "identical_to_stock_greedy": identical,
            "domains": {domain: summary(domain) for domain in domains}, "overall": summary(None)}


def _sweep(runs: list[dict], mode: str) -> list[dict]:
    """The runs of one decoding mode with the sampler, by number of masks."""
    return [r for r in runs if r["decoding"] == mode and r["sampler"]]


def format_table(results: dict) -> str:
    lines = []
    for domain, result in results["domains"].items():
        runs = result["runs"]
        lines.append(f"{domain}: tokens per step by number of masks (with the sampler), and speed-up over stock greedy")
        lines.append("  masks             " + " ".join(f"{r['num_masks']:>6}" for r in _sweep(runs, MODES[0])))
        for mode in MODES:
            sweep = _sweep(runs, mode)
            lines.append(f"  {mode:<9} tok/st  " + " ".join(f"{r['tokens_per_step']:>6.2f}" for r in sweep))
            lines.append(f"  {'':<9} speed-up" + " ".join(f"{'x' + format(r['speedup'], '.2f'):>6}" for r in sweep))
        without = [r for r in runs if not r["sampler"]]
        lines.append(f"  without the sampler at {without[0]['num_masks']} masks: " + ", ".join(
            f"{r['decoding']} {r['tokens_per_step']:.2f} tokens/step x{r['speedup']:.2f}" for r in without))
        fastest = result["fastest"]
        lines.append(f"  stock greedy {result['stock_tokens_per_second']:.1f} tokens/s; fastest here: "
                     f"{_describe(fastest)}, x{fastest['speedup']:.2f}")
    fastest = results["overall"]["fastest"]
    lines.append(f"all domains: fastest here {_describe(fastest)}, {fastest['tokens_per_step']:.2f} tokens/step, "
                 f"x{fastest['speedup']:.2f} vs stock greedy")
    lines.append(f"identical to stock greedy: {results['identical_to_stock_greedy']}")
    return "\n".join(lines)


def _describe(run: dict) -> str:
    return f"{run['num_masks']} masks, {run['decoding']}" + ("" if run["sampler"] else ", no sampler")


def draw_chart(results: dict, path: str | Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (steps_axis, speed_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (domain, result) in enumerate(results["domains"].items()):
        for mode, style in zip(MODES, ("-", "--")):
            sweep = _sweep(result["runs"], mode)
            masks = [r["num_masks"] for r in sweep]
            line = {"marker": "o", "color": f"C{index}", "label": f"{domain}, {mode}"}
            steps_axis.plot(masks, [r["tokens_per_step"] for r in sweep], style, **line)
            speed_axis.plot(masks, [r["speedup"] for r in sweep], style, **line)
    steps_axis.set_ylabel("tokens per step")
    speed_axis.set_ylabel("speed-up over stock greedy (wall clock)")
    speed_axis.axhline(1.0, color="grey", linewidth=0.8)
    for axis in (steps_axis, speed_axis):
        axis.set_xlabel("masks (drafts per step)")
        axis.grid(alpha=0.3)
    steps_axis.legend(fontsize=8)
    figure.suptitle(f"MTP with the sampler, greedy, up to {results['max_steps']} steps per prompt")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def eval_main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mtp_model
    from mtp_model.adapter import load_config

    parser = ArgumentParser(prog="mtp eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=model_dir, help="directory of the base model")
    parser.add_argument("--adapter", required=True, help="directory of its MTP adapter")
    parser.add_argument("--prompts", required=True, help="JSONL with 'prompt' (or 'messages') and 'domain'")
    parser.add_argument("--out", default="mtp_eval.json")
    parser.add_argument("--chart", default=None, help="PNG path (default: next to --out)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None,
                        help="default: the checkpoint's dtype on a GPU, float32 on a CPU (whose half-precision "
                             "matmuls are slow and would skew the wall-clock comparison)")
    parser.add_argument("--max-steps", type=bounded(int, 1), default=100)
    parser.add_argument("--repeats", type=bounded(int, 1), default=2,
                        help="timed runs per generation; the fastest counts")
    parser.add_argument("--limit", type=bounded(int, 1), default=None, help="use only the first N prompts")
    parser.add_argument("--per-domain", type=bounded(int, 1), default=None,
                        help="use only the first N prompts of each domain")
    parser.add_argument("--save-fastest", action="store_true",
                        help="make the fastest configuration over all domains (with the sampler) the adapter's "
                             "generate default")
    args = parser.parse_args(argv)
    prompts = read_or_exit(parser, read_prompts, args.prompts, args.per_domain)[: args.limit]
    if not prompts:
        parser.error(f"{args.prompts}: no prompts")
    read_or_exit(parser, load_config, args.adapter)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"argument --device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {args.device}, but this machine has no CUDA device")
    for option, path in (("--out", args.out), ("--chart", args.chart)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            parser.error(f"argument {option}: {Path(path).parent} is not a directory")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = args.dtype or ("float32" if device.type == "cpu" else "auto")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    model = mtp_model.patch(model.to(device).eval(), adapter=args.adapter)
    results = evaluate(model, tokenizer, prompts, max_steps=args.max_steps, repeats=args.repeats)
    print(format_table(results))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    chart = Path(args.chart or Path(args.out).with_suffix(".png"))
    print(f"results: {args.out}" + (f", chart: {chart}" if draw_chart(results, chart) else " (no matplotlib: no chart)"))
    if args.save_fastest and results["identical_to_stock_greedy"]:
        best = max((r for r in results["overall"]["runs"] if r["sampler"]), key=lambda r: r["tokens_per_second"])
        mtp_model.set_generation_defaults(args.adapter, best["num_masks"], best["decoding"])
        print(f"{args.adapter}: generate now defaults to {best['num_masks']} masks, {best['decoding']}")
    return 0 if results["identical_to_stock_greedy"] else 1
