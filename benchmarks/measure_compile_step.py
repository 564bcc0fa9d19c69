"""The compiled decoding step against the eager one, end to end: compile time and generation time.

    python benchmarks/measure_compile_step.py --model demo-model --out benchmarks/results/compile_step_demo_cpu.json
    python benchmarks/measure_compile_step.py --model smollm2-135m-instruct --out ...
    python benchmarks/measure_compile_step.py --device cuda --mode reduce-overhead --out ...  # CUDA graphs

One process: the model with its shipped adapter at the adapter's generate defaults, greedy, batch 1, on
three prompts (the first public prompt of each domain for a chat model, held-out prompts for the demo
model). The first pass through `mtp_model.compile_step(model)` (inductor, `dynamic=True`; `--freezing`
adds inductor's freezing; `--mode reduce-overhead` asks for CUDA graphs on a GPU) pays the compilation, a second one shows any recompilation; then `--repeats`
rounds alternate stock greedy, the eager MTP step and the compiled one, and the medians of the rounds are
reported with every output checked against stock greedy's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo-model", help="demo-model or a known model's name")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--freezing", action="store_true",
                        help="compile with inductor's freezing (packs the weights; bakes them into the graph)")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch
    import transformers
    from common import shipped_model_and_prompts

    import mtp_model

    model, prompts = shipped_model_and_prompts(args.model)
    model = model.to(args.device)
    prompts = [ids.to(args.device) for ids in prompts]
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    stock_generate = type(model).generate

    def stock(ids):
        return stock_generate(model, ids, max_new_tokens=args.max_new_tokens, do_sample=False)

    def mtp(ids):
        return model.generate(ids, max_new_tokens=args.max_new_tokens)

    def timed(run):
        synchronize()
        start = time.perf_counter()
        outputs = [run(ids) for ids in prompts]
        synchronize()
        return time.perf_counter() - start, outputs

    _, expected = timed(stock)
    steps = tokens = 0
    for ids in prompts:
        mtp(ids)
        steps += model.mtp_stats["steps"]
        tokens += model.mtp_stats["tokens"]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_options = {"options": {"freezing": True}} if args.freezing else {}
    if args.mode:
        compile_options["mode"] = args.mode
    compiled_step = mtp_model.compile_step(model, **compile_options).mtp_compiled_step
    first_pass, outputs = timed(mtp)
    second_pass, _ = timed(mtp)
    identical = all(torch.equal(a, b) for a, b in zip(outputs, expected))
    graphs_after_warm_up = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    runs = {"stock": stock, "eager": mtp, "compiled": mtp}
    rounds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            mtp_model.compile_step(model, enabled=False)
            if name == "compiled":
                model.mtp_compiled_step = compiled_step
            seconds, outputs = timed(run)
            identical &= all(torch.equal(a, b) for a, b in zip(outputs, expected))
            rounds[name].append(round(seconds, 3))
    median = {name: statistics.median(values) for name, values in rounds.items()}
    result = {
        "model": args.model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "freezing": args.freezing, "mode": args.mode, "device": str(model.device),
        "mtp_steps": steps, "mtp_tokens": tokens, "identical_to_stock": identical,
        "first_compiled_pass_s": round(first_pass, 1), "second_compiled_pass_s": round(second_pass, 1),
        "graphs_after_warm_up": graphs_after_warm_up,
        "graphs_in_all": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        # With --mode reduce-overhead: graphs inductor ran without CUDA graphs (its log says why).
        "cudagraph_skips": torch._dynamo.utils.counters["inductor"]["cudagraph_skips"],
        "seconds": rounds, "median_s": median,
        "eager_ms_per_step": round(1000 * median["eager"] / steps, 1),
        "compiled_ms_per_step": round(1000 * median["compiled"] / steps, 1),
        "compiled_over_eager": round(median["compiled"] / median["eager"], 3),
        "stock_over_eager": round(median["stock"] / median["eager"], 3),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if model.device.type == "cuda" else None},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
