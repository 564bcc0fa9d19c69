"""`mtp train`: train an MTP adapter for a local Hugging Face model on a JSONL file.

    mtp train --model DIR --data FILE.jsonl --out DIR [--num-masks 8 --rank 16 --alpha 32 --lr 2e-4 ...]

Runs on one CPU, one GPU, or several GPUs under `accelerate launch` / `torchrun` with no change (the
Hugging Face Trainer does the distribution). Writes the adapter to --out; checkpoints go to
--out/checkpoints and `--resume` continues from the last one. An --out that already holds an adapter or
checkpoints is refused unless `--resume` or `--overwrite` (which starts afresh, dropping the old
checkpoints) says what to do with it. Every option, the data file and the model's attention window are
checked before the model is loaded (`cli.py` has the error conventions).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from mtp_model.checkpoints import model_dir
from mtp_model.cli import ArgumentParser, bounded, read_or_exit


# --lr-schedule -> the Trainer's scheduler; each warms up linearly over --warmup-steps first
LR_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="mtp train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=model_dir,
                        help="directory of a Llama / Qwen2 / Qwen3 / Mistral model")
    parser.add_argument("--data", required=True, help="JSONL of chat messages or prompt/response pairs")
    parser.add_argument("--out", required=True, help="directory for the adapter")
    parser.add_argument("--num-masks", type=bounded(int, 1), default=8)
    parser.add_argument("--rank", type=bounded(int, 1), default=16)
    parser.add_argument("--alpha", type=bounded(float, 0, low_open=True), default=32.0)
    parser.add_argument("--lr", type=bounded(float, 0, low_open=True), default=2e-4)
    parser.add_argument("--steps", type=bounded(int, 1), default=1000)
    parser.add_argument("--warmup-steps", type=bounded(int, 0), default=0)
    parser.add_argument("--lr-schedule", choices=sorted(LR_SCHEDULES), default="constant",
                        help="learning rate after warm-up: constant (the paper), or decaying to 0 at --steps")
    parser.add_argument("--batch", type=bounded(int, 1), default=8, help="sequences per device per step")
    parser.add_argument("--grad-accum", type=bounded(int, 1), default=1)
    parser.add_argument("--max-length", type=bounded(int, 2), default=1024,
                        help="tokens per sequence before masks are added")
    parser.add_argument("--self-distill", action="store_true", help="replace responses by the model's greedy output")
    parser.add_argument("--distill-max-new-tokens", type=bounded(int, 1), default=None,
                        help="the self-distilled responses' token budget (default 256; needs --self-distill)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--save-steps", type=bounded(int, 1), default=500)
    parser.add_argument("--max-minutes", type=bounded(float, 0, low_open=True), default=None,
                        help="stop after this many minutes of training (at the end of a step, with a checkpoint and "
                             "the adapter written as at --steps)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    existing.add_argument("--overwrite", action="store_true",
                          help="replace the adapter and checkpoints already in --out (default: refuse)")
    parser.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0)
    parser.add_argument("--consistency-reduction", choices=["mean", "sum"], default="mean")
    parser.add_argument("--mask-decay", type=bounded(float, 0, 1, low_open=True), default=1.0,
                        help="cross-entropy weight of mask i is DECAY ** (i - 1) (1: the paper's equal weights)")
    parser.add_argument("--anchor-fraction", type=bounded(float, 0, 1, low_open=True), default=1.0,
                        help="put mask blocks after this fraction of the response tokens, drawn per batch "
                             "(1: after every one, the paper's layout)")
    parser.add_argument("--regular-weight", type=bounded(float, 0, 1), default=1.0,
                        help="cross-entropy weight of the regular tokens (0 skips their LM-head products)")
    parser.add_argument("--sampler-residual", action="store_true",
                        help="the sampler corrects the mask state instead of replacing it (starts as the plain LM head)")
    parser.add_argument("--init-from", default=None, metavar="ADAPTER",
                        help="start from this adapter's tensors (same masks, rank and base model); parts it lacks, "
                             "such as a residual sampler's scale, start fresh")
    parser.add_argument("--draft-vocab", type=bounded(int, 1), default=None, metavar="N",
                        help="draft from the N tokens most frequent in the training responses (default: all)")
    return parser


def train_main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    import mtp_model
    from mtp_model.adapter import load_config, warm_start
    from mtp_model.data import most_frequent_tokens, read_jsonl, self_distill, tokenize_pairs
    from mtp_model.model_helpers import sliding_window
    from mtp_model.training import (LossWeights, MTPDataCollator, MTPTrainer, TimeLimit,
                                    enable_gradient_checkpointing, end_distributed_process)

    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    check_out(parser, out, args.resume, args.overwrite)
    if args.init_from is not None:
        read_or_exit(parser, load_config, args.init_from)
    if args.distill_max_new_tokens is not None and not args.self_distill:
        parser.error("--distill-max-new-tokens needs --self-distill")
    pairs = read_or_exit(parser, read_jsonl, args.data, args.self_distill)
    if not pairs:
        parser.error(f"{args.data}: no training records")
    skeleton = _skeleton(args.model)
    if args.draft_vocab is not None and args.draft_vocab > skeleton.config.vocab_size:
        parser.error(f"argument --draft-vocab: must be at most the model's vocabulary, {skeleton.config.vocab_size}, "
                     f"got {args.draft_vocab}")
    window = sliding_window(skeleton)
    if window is not None and args.max_length + args.num_masks > window:  # refused here, not hours in
        parser.error(f"this model attends within a sliding window of {window} tokens, which MTP training does not "
                     f"implement: --max-length plus --num-masks must be at most {window}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    if args.self_distill:
        model.eval()
        pairs = self_distill(model, tokenizer, pairs, args.distill_max_new_tokens or 256, batch_size=args.batch)
    examples = tokenize_pairs(tokenizer, pairs, args.max_length)

    config = mtp_model.MTPConfig(num_masks=args.num_masks, lora_rank=args.rank, lora_alpha=args.alpha,
                                 draft_vocab_size=args.draft_vocab, sampler_residual=args.sampler_residual)
    mtp_model.patch(model, config)
    if args.init_from is not None:
        fresh = warm_start(model, args.init_from)
        print(f"mtp train: started from {args.init_from}" + (f"; fresh: {', '.join(fresh)}" if fresh else ""))
    if args.draft_vocab is not None:
        eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
        model.mtp.set_draft_tokens(most_frequent_tokens(examples, args.draft_vocab, model.config.vocab_size, eos),
                                   model.config.vocab_size)
    if args.bf16:  # mixed precision: the adapter's trained parameters stay fp32 (bf16 would round away
        # most small optimizer updates); the Trainer's autocast runs the products in bf16.
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    training_args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=LR_SCHEDULES[args.lr_schedule],
        logging_steps=max(1, min(50, args.steps // 20)),
        save_steps=args.save_steps,
        save_total_limit=2,
        bf16=args.bf16,
        remove_unused_columns=False,
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = MTPTrainer(
        model=model,
        args=training_args,
        train_dataset=examples,
        data_collator=MTPDataCollator(args.num_masks, model.config.vocab_size, args.anchor_fraction, args.seed),
        loss_weights=LossWeights(consistency_reduction=args.consistency_reduction, mask_decay=args.mask_decay,
                                 regular=args.regular_weight),
        callbacks=None if args.max_minutes is None else [TimeLimit(args.max_minutes)],
    )
    if args.overwrite and training_args.should_save:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # else the Trainer keeps the old run's steps
    trainer.train(resume_from_checkpoint=args.resume or None)
    if trainer.args.should_save:
        mtp_model.save_adapter(model, out)
        print(f"mtp train: adapter written to {out}")
    end_distributed_process()
    return 0


def check_out(parser: argparse.ArgumentParser, out: Path, resume: bool, overwrite: bool) -> None:
    """Usage errors for an --out that training would silently clobber, or that --resume cannot resume."""
    from mtp_model.adapter import CONFIG_FILE

    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: exists and is not a directory")
    checkpoints = any((out / "checkpoints").glob("checkpoint-*"))
    if resume and not checkpoints:
        parser.error(f"--resume: no checkpoint in {out / 'checkpoints'} to continue from")
    if not (resume or overwrite) and (checkpoints or (out / CONFIG_FILE).exists()):
        parser.error(f"--out {out} already holds an adapter or training checkpoints: pass --resume to continue "
                     f"that training or --overwrite to replace it")


def _skeleton(path: Path):
    """The model's modules on the meta device: its architecture, for checks, without loading a weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
