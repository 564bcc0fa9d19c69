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

from mtp_model.checkpoints import model_dir
from mtp_model.cli import ArgumentParser, bounded, read_or_exit
from mtp_model.data import iter_jsonl, prompt_ids

MODES = ("quadratic", "linear")
LOOKUP = ("prompt_lookup",)  # the key of stock generate's prompt-lookup decoding in the measurements


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


class _Clock:
    """A streamer that notes when each new token arrives: `seconds[n - 1]` is the time to the first n."""

    def __init__(self):
        self.start, self.seconds, self.prompt_seen = time.perf_counter(), [], False

    def put(self, value):
        if not self.prompt_seen:  # the first put is the prompt
            self.prompt_seen = True
            return
        now = time.perf_counter()
        self.seconds += [now - self.start] * value.numel()

    def end(self):
        pass


def _timed(generate, repeats: int):
    """(output, [time to the first n tokens for each n]) of `generate(streamer)`, the fastest of `repeats`
    runs per n."""
    fastest = None
    for _ in range(repeats):
        clock = _Clock()
        out = generate(clock)
        fastest = clock.seconds if fastest is None else [min(a, b) for a, b in zip(fastest, clock.seconds)]
    return out, fastest


def _stock(model, ids, max_new_tokens: int, repeats: int, **options):
    """Stock greedy generate: (output, times to the first n tokens)."""
    return _timed(lambda clock: type(model).generate(
        model, input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
        streamer=clock, **options), repeats)


def _mtp(model, ids, repeats: int, **options):
    """MTP generate: (output, its stats, times to the first n tokens)."""
    out, seconds = _timed(lambda clock: model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, streamer=clock, **options), repeats)
    return out, model.mtp_stats, seconds


def _time_against_stock(timed, seconds, key, run_seconds, stock_seconds) -> None:
    """Adds a run's time and stock's to the same number of tokens: the tokens both made (fewer than the
    run's only where their outputs diverge, as half precision allows at stock's near-ties)."""
    n = min(len(run_seconds), len(stock_seconds))
    if n:
        timed[key] += n
        seconds[key] += run_seconds[n - 1]
        timed[(key[0], "stock", key[1:])] += n
        seconds[(key[0], "stock", key[1:])] += stock_seconds[n - 1]


def sweep_configs(k: int, masks: list[int] | None = None, modes: tuple[str, ...] = MODES) -> list[tuple]:
    """(masks, mode, sampler) to measure: the given numbers of masks (default 1..k) with the sampler in each
    mode, and k masks without it (the paper's ablation)."""
    masks = list(range(1, k + 1)) if masks is None else masks
    return [(j, mode, True) for mode in modes for j in masks] + [(k, mode, False) for mode in modes]


def evaluate(model, tokenizer, prompts, max_steps: int = 100, max_masks: int | None = None, repeats: int = 2,
             configs: list[tuple] | None = None, prompt_lookup: int | None = 10) -> dict:
    """Runs every measurement on a patched model; returns the results as a JSON-ready dict.

    Per prompt: each MTP configuration (`configs`, default `sweep_configs(k)`) generates for up to
    `max_steps` steps; then stock greedy generates as many tokens as the longest of them, once per repeat;
    each configuration's tokens are compared with stock's (identical in fp32, or MTP is broken) and, both
    timed token by token, its time to a number of tokens against stock's to the same number; then stock
    generate with prompt-lookup decoding (`prompt_lookup` draft tokens; None skips it) makes as many
    tokens, checked and timed the same way."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    k = max_masks or model.mtp_config.num_masks
    configs = configs or sweep_configs(k)
    device = model.get_input_embeddings().weight.device
    budget = max_steps * (k + 1)
    tokens, steps = defaultdict(int), defaultdict(int)  # tokens per step
    timed, seconds = defaultdict(int), defaultdict(float)  # tokens per second
    identical = True
    with torch.inference_mode():
        # Warm-up: first-call costs (allocator, weight packing, lazy init) stay out of the timings.
        ids = torch.tensor([prompt_ids(tokenizer, prompts[0][1])], device=device)
        _mtp(model, ids, 1, max_new_tokens=k + 1, max_steps=1)
        _stock(model, ids, 2, 1)
        for domain, prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
            runs = {}
            for j, mode, sampler in configs:
                runs[(j, mode, sampler)] = _mtp(model, ids, repeats, max_new_tokens=budget, max_steps=max_steps,
                                                num_masks=j, decoding=mode, use_sampler=sampler)
            longest = max(stats["tokens"] for _, stats, _ in runs.values())
            reference, stock_seconds = _stock(model, ids, longest, repeats)
            for config, (out, stats, run_seconds) in runs.items():
                identical &= torch.equal(out, reference[:, : out.shape[1]])
                tokens[(domain, *config)] += stats["tokens"]
                steps[(domain, *config)] += stats["steps"]
                _time_against_stock(timed, seconds, (domain, *config), run_seconds, stock_seconds)
            if prompt_lookup:
                lookup, lookup_seconds = _stock(model, ids, longest, repeats, prompt_lookup_num_tokens=prompt_lookup)
                identical &= torch.equal(lookup, reference)
                _time_against_stock(timed, seconds, (domain, *LOOKUP), lookup_seconds, stock_seconds)
    return _summarise(configs, tokens, steps, timed, seconds, sorted({d for d, _ in prompts}), identical, max_steps,
                      prompt_lookup)


def public_prompts(_name: str = "public", per_domain: int | None = None) -> list[tuple[str, object]]:
    """(domain, chat messages) from the public prompt sets (HumanEval, held-out ShareGPT chat and math)."""
    from mtp_model.prompts import evaluation_sets

    return [(domain, [{"role": "user", "content": p["prompt"]}])
            for domain, chosen in evaluation_sets().items() for p in chosen[:per_domain]]


def _mask_list(text: str) -> list[int]:
    try:
        masks = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if masks[0] < 1:
        raise argparse.ArgumentTypeError("numbers of masks must be >= 1")
    return masks


def _mode_list(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    if not modes or set(modes) - set(MODES):
        raise argparse.ArgumentTypeError(f"{text!r}: modes are {', '.join(MODES)}")
    return modes


def _summarise(configs, tokens, steps, timed, seconds, domains, identical, max_steps, prompt_lookup) -> dict:
    def total(counter, domain, *key):  # domain None: every domain together
        return sum(value for k, value in counter.items() if k[1:] == key and domain in (None, k[0]))

    def speedup(domain, key):  # tokens/s, and the ratio to stock greedy's time for exactly the same tokens
        elapsed = max(total(seconds, domain, *key), 1e-9)
        return total(timed, domain, *key) / elapsed, total(seconds, domain, "stock", key) / elapsed

    def summary(domain):
        rows = []
        for config in configs:
            speed, ratio = speedup(domain, config)
            rows.append({"num_masks": config[0], "decoding": config[1], "sampler": config[2],
                         "tokens_per_step": round(total(tokens, domain, *config) / max(total(steps, domain, *config), 1), 3),
                         "tokens_per_second": round(speed, 1), "speedup": round(ratio, 3)})
        stock_tokens = sum(total(timed, domain, "stock", config) for config in configs)
        stock_seconds = sum(total(seconds, domain, "stock", config) for config in configs)
        result = {"stock_tokens_per_second": round(stock_tokens / max(stock_seconds, 1e-9), 1), "runs": rows,
                  "fastest": max(rows, key=lambda r: r["speedup"])}
        if prompt_lookup:
            speed, ratio = speedup(domain, LOOKUP)
            result["prompt_lookup"] = {"num_tokens": prompt_lookup, "tokens_per_second": round(speed, 1),
                                       "speedup": round(ratio, 3)}
        return result

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
        modes = list(dict.fromkeys(r["decoding"] for r in runs))
        lines.append("  masks             " + " ".join(f"{r['num_masks']:>6}" for r in _sweep(runs, modes[0])))
        for mode in modes:
            sweep = _sweep(runs, mode)
            lines.append(f"  {mode:<9} tok/st  " + " ".join(f"{r['tokens_per_step']:>6.2f}" for r in sweep))
            lines.append(f"  {'':<9} speed-up" + " ".join(f"{'x' + format(r['speedup'], '.2f'):>6}" for r in sweep))
        without = [r for r in runs if not r["sampler"]]
        lines.append(f"  without the sampler at {without[0]['num_masks']} masks: " + ", ".join(
            f"{r['decoding']} {r['tokens_per_step']:.2f} tokens/step x{r['speedup']:.2f}" for r in without))
        fastest = result["fastest"]
        lines.append(f"  stock greedy {result['stock_tokens_per_second']:.1f} tokens/s; fastest here: "
                     f"{_describe(fastest)}, x{fastest['speedup']:.2f}")
        if "prompt_lookup" in result:
            lookup = result["prompt_lookup"]
            lines.append(f"  prompt-lookup decoding ({lookup['num_tokens']} tokens): x{lookup['speedup']:.2f}")
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
    parser.add_argument("--prompts", required=True,
                        help="JSONL with 'prompt' (or 'messages') and 'domain', or 'public': HumanEval, held-out "
                             "ShareGPT chat and calculation requests (mtp_model.prompts)")
    parser.add_argument("--masks", type=_mask_list, default=None,
                        help="numbers of masks to sweep, e.g. 1,2,4,8 (default: 1..k)")
    parser.add_argument("--modes", type=_mode_list, default=MODES, help="decoding modes, e.g. quadratic,linear")
    parser.add_argument("--prompt-lookup", type=bounded(int, 0), default=10,
                        help="draft tokens of the prompt-lookup baseline (0: skip it)")
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
    read = public_prompts if args.prompts == "public" else read_prompts
    prompts = read_or_exit(parser, read, args.prompts, args.per_domain)[: args.limit]
    if not prompts:
        parser.error(f"{args.prompts}: no prompts")
    k = read_or_exit(parser, load_config, args.adapter).num_masks
    if args.masks is not None and max(args.masks) > k:
        parser.error(f"argument --masks: the adapter has {k} masks")
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
    results = evaluate(model, tokenizer, prompts, max_steps=args.max_steps, repeats=args.repeats,
                       configs=sweep_configs(k, args.masks, args.modes), prompt_lookup=args.prompt_lookup or None)
    print(format_table(results))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    chart = Path(args.chart or Path(args.out).with_suffix(".png"))
    print(f"results: {args.out}" + (f", chart: {chart}" if draw_chart(results, chart) else " (no matplotlib: no chart)"))
    if args.save_fastest and results["identical_to_stock_greedy"]:
        best = max((r for r in results["overall"]["runs"] if r["sampler"]), key=lambda r: r["speedup"])
        mtp_model.set_generation_defaults(args.adapter, best["num_masks"], best["decoding"])
        print(f"{args.adapter}: generate now defaults to {best['num_masks']} masks, {best['decoding']}")
    return 0 if results["identical_to_stock_greedy"] else 1
