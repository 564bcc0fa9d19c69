"""How the shipped adapters of real models are built: one command, fixed seed, resumable at every stage.

    mtp build-adapter smollm2-135m-instruct [--work DIR] [--stage distill|train|all]

Stages, each skipping what an earlier (interrupted) run finished:
1. the base model: the registry package's GGUF converted once to a float32 HF directory (`checkpoints`);
2. prompts: ShareGPT first turns of the training split (`prompts`), shuffled with the seed, the first
   `num_prompts` whose chat-rendered prompt fits `max_prompt_tokens`;
3. self-distillation: the model's own greedy reply to each (`data.distill_jsonl`, appended in chunks);
4. training: `mtp train` on the replies, in the recipe's stages (each may start from the adapter of the one
   before), each resuming from its last checkpoint;
5. the last stage's adapter is copied into the package (`mtp_model/adapters/<name>`), where `patch(model,
   adapter=<name>)` finds it, with the recipe's `generate` defaults (the fastest configuration `mtp eval`
   measured for it).
"""

from __future__ import annotations

import argparse
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mtp_model.adapter import SHIPPED_DIR, WEIGHTS_FILE, set_generation_defaults
from mtp_model.checkpoints import cache_root, model_directory


@dataclass(frozen=True)
class TrainingStage:
    out: str  # directory under the work directory; the last stage's adapter is the one shipped
    args: tuple[str, ...]  # `mtp train` options besides model, data, out and resume
    init_from: str | None = None  # an earlier stage's `out`, whose adapter this stage starts from
    prompts: int | None = None  # trains on the replies to the first this many prompts (None: all of them)


@dataclass(frozen=True)
class Recipe:
    num_prompts: int
    max_prompt_tokens: int
    distill_max_new_tokens: int
    distill_batch: int
    stages: tuple[TrainingStage, ...] = field(default_factory=tuple)
    seed: int = 0
    generate_defaults: tuple[int, str] | None = None  # (masks, decoding): the fastest `mtp eval` measured


_SMOLLM2_TRAIN = ("--num-masks", "8", "--rank", "16", "--alpha", "32", "--lr", "1e-3", "--warmup-steps", "10",
                  "--batch", "4", "--max-length", "448", "--anchor-fraction", "0.5", "--regular-weight", "0",
                  "--draft-vocab", "16384", "--save-steps", "10")

RECIPES = {
    # Five stages, each from the one before: 1, the LoRA with the paper's sampler; 2, the residual sampler
    # (it starts as the plain LM head, which the paper's sampler learned far slower than); 3, twice the
    # replies; 4, the learning rate annealed to 0; 5, warmed up again and annealed over all 4096 replies,
    # masks after a quarter of the response tokens. Stages 1-3 keep the learning rate constant after
    # warm-up, so a resumed run with more --steps continues a shorter one exactly. What each stage gained and
    # what the whole costs on a 2-core CPU: benchmarks/results/README.md.
    "smollm2-135m-instruct": Recipe(
        num_prompts=4096,
        max_prompt_tokens=256,
        distill_max_new_tokens=160,
        distill_batch=32,
        stages=(
            TrainingStage("stage1", (*_SMOLLM2_TRAIN, "--steps", "71", "--seed", "0"), prompts=512),
            TrainingStage("stage2", (*_SMOLLM2_TRAIN, "--steps", "250", "--seed", "1", "--sampler-residual"),
                          init_from="stage1", prompts=512),
            TrainingStage("stage3", (*_SMOLLM2_TRAIN, "--steps", "400", "--seed", "2", "--sampler-residual"),
                          init_from="stage2", prompts=1024),
            TrainingStage("stage4", (*_SMOLLM2_TRAIN, "--steps", "100", "--seed", "3", "--sampler-residual",
                                     "--lr-schedule", "linear"), init_from="stage3", prompts=1024),
            TrainingStage("adapter", (*_SMOLLM2_TRAIN, "--anchor-fraction", "0.25", "--steps", "360", "--seed", "5",
                                      "--sampler-residual", "--lr-schedule", "linear"), init_from="stage4"),
        ),
        generate_defaults=(1, "quadratic"),  # benchmarks/results/README.md: the fastest on the 2-core CPU
    ),
}


def training_prompts(tokenizer, recipe: Recipe) -> list[dict]:
    from mtp_model.data import prompt_ids
    from mtp_model.prompts import sharegpt_first_turns

    turns = sharegpt_first_turns("train")
    random.Random(recipe.seed).shuffle(turns)
    chosen = []
    for turn in turns:
        if len(prompt_ids(tokenizer, [{"role": "user", "content": turn["prompt"]}])) <= recipe.max_prompt_tokens:
            chosen.append(turn)
            if len(chosen) == recipe.num_prompts:
                break
    return chosen


def _training_file(prompts_file: Path, distilled: Path, out: Path, count: int | None = None) -> Path:
    """The distilled replies of exactly the recipe's prompts (the first `count` of them when given), in
    their order (a distillation file may hold replies to prompts an older prompt list had)."""
    from mtp_model.data import iter_jsonl

    replies = {record["id"]: line for (_, record), line in zip(iter_jsonl(distilled), _lines(distilled))}
    order = [record["id"] for _, record in iter_jsonl(prompts_file)][:count]
    missing = [record_id for record_id in order if record_id not in replies]
    if missing:
        raise RuntimeError(f"{len(missing)} prompts of {prompts_file} have no distilled reply yet; run the distill "
                           f"stage first")
    out.write_text("".join(replies[record_id] for record_id in order), encoding="utf-8")
    return out


def _lines(path: Path):
    return (line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip())


def build_adapter(name: str, work: Path, stage: str = "all") -> Path | None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtp_model.data import distill_jsonl
    from mtp_model.prompts import write_jsonl
    from mtp_model.train_cli import train_main

    recipe = RECIPES[name]
    model_dir = model_directory(name)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts_file = work / "prompts.jsonl"
    if not prompts_file.is_file() or sum(1 for _ in _lines(prompts_file)) != recipe.num_prompts:
        write_jsonl(prompts_file, training_prompts(tokenizer, recipe))  # a longer list keeps a shorter as its prefix
    distilled = work / "distilled.jsonl"
    if stage in ("distill", "all"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        distill_jsonl(model, tokenizer, prompts_file, distilled, recipe.distill_max_new_tokens, recipe.distill_batch,
                      chunk=recipe.distill_batch,
                      progress=lambda done, total: print(f"distill: {done}/{total} prompts", flush=True))
        del model
    if stage not in ("train", "all"):
        return None
    for training in recipe.stages:
        out = work / training.out
        if (out / WEIGHTS_FILE).is_file():
            continue  # finished by an earlier run (`mtp train` writes the adapter when it ends)
        resume = ["--resume"] if any((out / "checkpoints").glob("checkpoint-*")) else []
        init = [] if training.init_from is None else ["--init-from", str(work / training.init_from)]
        train_file = _training_file(prompts_file, distilled, work / f"train-{training.out}.jsonl", training.prompts)
        train_main(["--model", str(model_dir), "--data", str(train_file), "--out", str(out), *training.args,
                    *init, *resume])
    shipped = SHIPPED_DIR / name
    shipped.mkdir(parents=True, exist_ok=True)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(out / file, shipped / file)
    if recipe.generate_defaults is not None:
        set_generation_defaults(shipped, *recipe.generate_defaults)
    print(f"mtp build-adapter: {name} adapter written to {shipped}")
    return shipped


def build_main(argv: list[str] | None = None) -> int:
    from mtp_model.cli import ArgumentParser

    parser = ArgumentParser(prog="mtp build-adapter", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: the mtp cache)")
    parser.add_argument("--stage", choices=["distill", "train", "all"], default="all")
    args = parser.parse_args(argv)
    build_adapter(args.name, args.work or cache_root() / "build" / args.name, args.stage)
    return 0


if __name__ == "__main__":
    raise SystemExit(build_main())
