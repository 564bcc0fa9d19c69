"""Where a decoding step's time goes: the parts of an MTP step against a stock greedy token, on one CPU.

    python benchmarks/measure_step_time.py --model smollm2-135m-instruct --out benchmarks/results/step_time_smollm2_cpu.json

One process, batch 1, greedy, fp32: the model with its shipped adapter on the first public prompt of each
domain (held-out prompts for the demo model). For each configuration (the adapter's defaults, then
`--configs`), `--repeats` rounds alternate stock greedy and MTP generation, every MTP output checked
against stock's. The parts of `mtp_model.decoding.Decoder` a step calls are timed with the wall clock
around each call (`forward`: the decoder stack over the step's tokens; `verify`: the full LM head on the
regular rows and the acceptance rule; `draft`: the sampler chain over the draft vocabulary; `emit`: the
output bookkeeping; the cache's `keep` and `reserve`); what is left of a step is the loop's own Python and
tensor work. One more run under torch.profiler attributes each part's CPU time to operators (self time,
summed by operator name; stock greedy's likewise), which says whether a part is its arithmetic or the
dispatch around it. The
prefill is not a step: its forward, first token and first drafts are reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

# The decoder's methods and the cache's whose time each step is reported in, by part name.
_DECODER_PARTS = ("run", "forward", "verify", "draft", "emit", "first_token")
_CACHE_PARTS = ("keep", "reserve")


class _PartClock:
    """Wraps methods of the decoding classes so each call adds its wall-clock time to its part; the calls
    made while the prefill runs (up to its first drafts) are booked under "prefill:<part>"."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.in_prefill = True
        self.labels = False  # also open a torch.profiler range per call

    @contextlib.contextmanager
    def installed(self, classes_and_names):
        import torch

        originals = []
        for cls, name in classes_and_names:
            original = getattr(cls, name)
            originals.append((cls, name, original))

            def timed(*args, _original=original, _name=name, **kwargs):
                part = f"prefill:{_name}" if self.in_prefill and _name != "run" else _name
                label = torch.profiler.record_function(f"part:{part}") if self.labels else contextlib.nullcontext()
                start = time.perf_counter()
                with label:
                    result = _original(*args, **kwargs)
                self.seconds[part] += time.perf_counter() - start
                self.calls[part] += 1
                if _name == "draft":
                    self.in_prefill = False
                return result

            setattr(cls, name, timed)
        try:
            yield self
        finally:
            for cls, name, original in originals:
                setattr(cls, name, original)

    def reset(self):
        self.seconds.clear()
        self.calls.clear()
        self.in_prefill = True


def _operator_table(profile, top: int) -> dict:
    """Self CPU time by operator inside each part's ranges: {part: [(operator, ms), ...]}, largest first.
    An operator belongs to the innermost part range that encloses it."""
    table = defaultdict(lambda: defaultdict(float))
    for event in profile.events():
        if event.name.startswith("part:"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("part:"):
            parent = parent.cpu_parent
        if parent is not None:
            table[parent.name[len("part:"):]][event.name] += event.self_cpu_time_total / 1000
    return {part: sorted(((name, round(ms, 2)) for name, ms in ops.items()), key=lambda row: -row[1])[:top]
            for part, ops in table.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="demo-model or a known model's name")
    parser.add_argument("--configs", default="8:quadratic",
                        help="more MASKS:MODE configurations after the adapter's defaults, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=8, help="operators listed per part")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch
    import transformers
    from common import shipped_model_and_prompts

    from mtp_model.attention import MTPCache
    from mtp_model.decoding import Decoder

    model, prompts = shipped_model_and_prompts(args.model)
    config = model.mtp_config
    configs = [(config.generate_num_masks or config.num_masks, config.decoding)]
    for item in filter(None, args.configs.split(",")):
        masks, mode = item.split(":")
        if (int(masks), mode) not in configs:
            configs.append((int(masks), mode))
    stock_generate = type(model).generate
    clock = _PartClock()
    methods = [(Decoder, name) for name in _DECODER_PARTS] + [(MTPCache, name) for name in _CACHE_PARTS]

    def stock():
        start = time.perf_counter()
        outputs = [stock_generate(model, ids, max_new_tokens=args.max_new_tokens, do_sample=False) for ids in prompts]
        return time.perf_counter() - start, outputs

    results = []
    with clock.installed(methods):
        for masks, mode in configs:
            options = {"max_new_tokens": args.max_new_tokens, "num_masks": masks, "decoding": mode}
            rounds, identical = defaultdict(list), True
            steps = loop_steps = tokens = 0
            for round_index in range(args.repeats + 1):  # round 0 warms up (packed weights, caches)
                stock_seconds, expected = stock()
                parts = defaultdict(float)
                mtp_seconds = 0.0
                steps = loop_steps = tokens = 0
                for ids, reference in zip(prompts, expected):
                    clock.reset()
                    start = time.perf_counter()
                    out = model.generate(ids, **options)
                    mtp_seconds += time.perf_counter() - start
                    identical &= torch.equal(out, reference)
                    steps += model.mtp_stats["steps"]
                    tokens += model.mtp_stats["tokens"]
                    loop_steps += clock.calls["verify"]
                    for part, seconds in clock.seconds.items():
                        parts[part] += seconds
                if round_index:
                    rounds["stock"].append(stock_seconds)
                    rounds["mtp"].append(mtp_seconds)
                    for part, seconds in parts.items():
                        rounds[part].append(seconds)
            median = {name: statistics.median(values) for name, values in rounds.items()}
            stock_tokens = sum(int(out.shape[1] - ids.shape[1]) for ids, out in zip(prompts, expected))
            stock_ms_per_token = 1000 * median["stock"] / stock_tokens
            prefill_ms = 1000 * sum(value for name, value in median.items() if name.startswith("prefill:"))
            step_parts = {name: value for name, value in median.items()
                          if name not in ("stock", "mtp", "run") and not name.startswith("prefill:")}
            step_ms = (1000 * median["run"] - prefill_ms) / loop_steps
            per_step = {name: round(1000 * value / loop_steps, 2) for name, value in step_parts.items()}
            per_step["rest of the loop"] = round(step_ms - sum(per_step.values()), 2)

            clock.labels = True
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                for ids in prompts:
                    clock.reset()
                    model.generate(ids, **options)
            clock.labels = False
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as stock_profile:
                stock()
            stock_ops = sorted(((row.key, round(row.self_cpu_time_total / 1000, 2))
                                for row in stock_profile.key_averages()), key=lambda row: -row[1])[: args.top]
            results.append({
                "num_masks": masks, "decoding": mode, "steps": steps, "loop_steps": loop_steps, "tokens": tokens,
                "tokens_per_step": round(tokens / steps, 3), "identical_to_stock": identical,
                "stock_ms_per_token": round(stock_ms_per_token, 2),
                "mtp_ms_per_step": round(step_ms, 2),
                "step_cost_in_stock_tokens": round(step_ms / stock_ms_per_token, 3),
                "prefill_ms_per_prompt": round(prefill_ms / len(prompts), 1),
                # generate's own work around the decoding loop: arguments, checks, the decoder's set-up
                "call_ms_per_prompt": round(1000 * (median["mtp"] - median["run"]) / len(prompts), 1),
                "ms_per_step": per_step,
                "share_of_step": {name: round(value / step_ms, 3) for name, value in per_step.items()},
                "speed_up": round(median["stock"] / median["mtp"], 3),
                "operators_ms_in_profiled_run": _operator_table(profile, args.top),
                "stock_operators_ms_in_profiled_run": stock_ops,
                "seconds": {name: [round(value, 4) for value in values] for name, values in rounds.items()},
            })
            print(json.dumps({key: value for key, value in results[-1].items()
                              if not isinstance(value, (dict, list)) or key == "ms_per_step"}, indent=1), flush=True)

    result = {
        "model": args.model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "configs": results,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
