"""Training MTP adapters: the data collator, the paper's losses and a `transformers.Trainer` subclass.

Examples are dicts with `input_ids` [n] and `loss_mask` [n] (True on response tokens). The collator lays
each one out for training (`layout.training_layout`: k masks after every loss-bearing token) and pads the
batch to [B, L]. The loss (`mtp_loss`) is, with weights configurable and 1 by default:
- base: cross-entropy of the model's own LM head over every labelled token, regular and mask (on regular
  tokens it carries no gradient, since their path is the frozen base model; it is kept for monitoring);
- sampler: cross-entropy of `lm_head(sampler([embed(previous token); h]))`, teacher-forced with the true
  previous token;
- consistency: squared distance of each mask's last hidden state to the detached hidden state of the
  regular token with the same position in the same sequence, averaged over pairs ("mean" over the hidden
  dimension by default; "sum" gives the paper's loss scale).
`mask_decay` < 1 weights the cross-entropies of mask i by mask_decay ** (i - 1) (Medusa's per-head decay; the
paper weights all alike, 1): drafts are accepted as a prefix, so the first masks' accuracy is worth most.
`regular` weights the regular tokens' rows in both cross-entropies (the paper: 1); 0 leaves them out, which
saves their LM-head products: decoding drafts only from mask states. The cross-entropies never hold the
logits of all rows at once (`mtp_kernels.linear_cross_entropy`, chunked).
Attention follows the layout's rule (`attention_inputs`): by default `training_attention.grid_attention`,
which scores each token only against the keys the rule lets it see, or a FlexAttention BlockMask when the
model runs `attn_implementation="flex_attention"` (long sequences on a GPU). Only the LoRA factors and the
sampler train (`patch` freezes everything else), so the Trainer's optimizer, precision and DDP/FSDP apply
unchanged; activation checkpointing goes through `enable_gradient_checkpointing` (MTPTrainer routes the
TrainingArguments flag there), which recomputes layers under the gate they first ran with.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from mtp_kernels.linear_cross_entropy import linear_cross_entropy
from mtp_model.adapter import load_weights, save_adapter
from mtp_model.attention import PREFIX
from mtp_model.layout import may_attend, training_layout
from mtp_model.model_helpers import embed_tokens, gate_context, is_patched, rope_length_limit, sliding_window
from mtp_model.training_attention import TrainingGrid

IGNORE_INDEX = -100


@dataclass
class LossWeights:
    base: float = 1.0
    sampler: float = 1.0
    consistency: float = 1.0
    consistency_reduction: str = "mean"  # over the hidden dimension: "mean" or "sum"
    mask_decay: float = 1.0  # cross-entropy weight of mask i: mask_decay ** (i - 1)
    regular: float = 1.0  # cross-entropy weight of regular tokens (0: their rows are skipped)

    def __post_init__(self):
        if self.consistency_reduction not in ("mean", "sum"):
            raise ValueError(f"consistency_reduction must be 'mean' or 'sum', got {self.consistency_reduction!r}")
        if not 0.0 < self.mask_decay <= 1.0:
            raise ValueError(f"mask_decay must be in (0, 1], got {self.mask_decay}")
        if not 0.0 <= self.regular <= 1.0:
            raise ValueError(f"regular must be in [0, 1], got {self.regular}")


class MTPDataCollator:
    """Turns examples ({"input_ids", "loss_mask"}) into padded MTP training batches.

    anchor_fraction < 1 puts mask blocks after that fraction of the loss-bearing tokens only: a sequence of
    n tokens then lays out as about n (1 + fraction k) tokens instead of n (1 + k), so each step sees more
    sequences for the same compute. The anchors are drawn per example and epoch from a generator seeded by
    (seed, epoch, the example's tokens), not from torch's global state: the Trainer collates batches ahead
    of the step that trains them and restores its random state on resume only after the first batch, so
    global draws would make a resumed run differ from an uninterrupted one. `MTPTrainer` sets `epoch`.
    """

    def __init__(self, num_masks: int, vocab_size: int, anchor_fraction: float = 1.0, seed: int = 0):
        if not 0.0 < anchor_fraction <= 1.0:
            raise ValueError(f"anchor_fraction must be in (0, 1], got {anchor_fraction}")
        self.num_masks = num_masks
        self.vocab_size = vocab_size
        self.anchor_fraction = anchor_fraction
        self.seed = seed
        self.epoch = 0

    def _anchors(self, ids: torch.Tensor) -> torch.Tensor | None:
        if self.anchor_fraction == 1.0:
            return None
        # hash() of a tuple of ints is the same in every process (only str hashes are salted).
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, *ids.tolist())) & (2**63 - 1))
        return torch.rand(ids.shape[0], generator=generator) < self.anchor_fraction

    def __call__(self, examples: list[dict]) -> dict:
        layouts = []
        for example in examples:
            ids = torch.as_tensor(example["input_ids"])
            layouts.append(training_layout(ids, torch.as_tensor(example["loss_mask"]).bool(), self.num_masks,
                                           self.vocab_size, anchors=self._anchors(ids)))
        length = max(layout.input_ids.shape[0] for layout in layouts)

        def stack(field, fill):
            out = torch.full((len(layouts), length), fill, dtype=torch.long)
            for row, layout in enumerate(layouts):
                values = getattr(layout, field)
                out[row, : values.shape[0]] = values
            return out

        valid = stack("anchor", -1) >= 0
        batch = {
            "input_ids": stack("input_ids", 0),
            "position_ids": stack("position_ids", 0),
            "labels": stack("labels", IGNORE_INDEX),
            "previous_ids": stack("previous_ids", 0),
            "consistency_target": stack("consistency_target", -1),
            "valid": valid,
        }
        batch["anchor"] = stack("anchor", -1)
        batch["mask_number"] = stack("mask_number", 0)
        return batch


def attention_inputs(model, batch: dict) -> dict:
    """The keyword arguments that give a forward over the batch's layout its attention rule: a FlexAttention
    BlockMask when the model runs flex_attention (long sequences on a GPU), otherwise the batch's
    `TrainingGrid` for `grid_attention` (the same rule without an L x L score matrix)."""
    anchor, mask_number, valid = batch["anchor"], batch["mask_number"], batch["valid"]
    if model.config._attn_implementation.removeprefix(PREFIX) == "flex_attention":
        return {"attention_mask": flex_block_mask(anchor, mask_number, valid)}
    # Any 4D tensor tells transformers the mask is prepared: without one it would build a dense [B, 1, L, L]
    # mask (the position ids look like packed sequences to it) that grid_attention never reads.
    prepared = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=anchor.device)
    return {"attention_mask": prepared, "mtp_grid": TrainingGrid.from_layout(anchor, mask_number, valid)}


def flex_block_mask(anchor, mask_number, valid):
    """The layout's rule as a FlexAttention BlockMask (sparse, built from the per-token rule)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        allowed = may_attend(anchor[b, q], mask_number[b, q], anchor[b, kv], mask_number[b, kv])
        return (allowed & valid[b, kv] & valid[b, q]) | (q == kv)

    B, L = anchor.shape
    return create_block_mask(mask_mod, B, None, L, L, device=anchor.device)


def _cross_entropy(lm_head, hidden, labels, row_weights):
    """CE over rows with a label and a non-zero weight, averaged with `row_weights` (same shape as labels)."""
    rows = (labels != IGNORE_INDEX) & (row_weights > 0)
    if not bool(rows.any()):
        return hidden.sum() * 0.0
    return linear_cross_entropy(hidden[rows], lm_head.weight, labels[rows], row_weights[rows])


def mtp_loss(model, batch: dict, weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict]:
    """Total loss and its terms (floats, for logging) on a collated batch."""
    ids = batch["input_ids"]
    _check_checkpointing(model)
    _check_window(model, batch["position_ids"])
    with gate_context(model, ids >= model.config.vocab_size):
        hidden = model.model(
            inputs_embeds=embed_tokens(model, ids),
            position_ids=batch["position_ids"],
            use_cache=False,
            **attention_inputs(model, batch),
        ).last_hidden_state
    labels = batch["labels"]
    mask_number = batch["mask_number"]
    row_weights = torch.where(mask_number > 0, weights.mask_decay ** (mask_number - 1).clamp(min=0).float(),
                              weights.regular)
    lm_head = model.get_output_embeddings()
    base = _cross_entropy(lm_head, hidden, labels, row_weights)
    previous = model.get_input_embeddings()(batch["previous_ids"]).to(hidden.dtype)
    labelled = (labels != IGNORE_INDEX) & (row_weights > 0)
    sampled = model.mtp.sampler(torch.cat([previous[labelled], hidden[labelled]], dim=-1))
    sampler = _cross_entropy(lm_head, sampled, labels[labelled], row_weights[labelled])

    target = batch["consistency_target"]
    paired = target >= 0
    if bool(paired.any()):
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(target)
        anchor_states = hidden[rows[paired], target[paired]].detach()
        squared = (hidden[paired].float() - anchor_states.float()) ** 2
        per_pair = squared.sum(-1) if weights.consistency_reduction == "sum" else squared.mean(-1)
        consistency = per_pair.mean()
    else:
        consistency = hidden.sum() * 0.0

    total = weights.base * base + weights.sampler * sampler + weights.consistency * consistency
    terms = {"loss_base": base.item(), "loss_sampler": sampler.item(), "loss_consistency": consistency.item()}
    return total, terms


def _check_window(model, positions: torch.Tensor) -> None:
    window = sliding_window(model)
    # The training layout's attention sees the whole sequence, as MTP decoding's does (which hands longer
    # calls to stock generate): past the window, the regular tokens' states would not be the model's.
    if window is not None and positions.numel() and int(positions.max()) + 1 > window:
        raise ValueError(f"this model attends within a sliding window of {window} tokens, which MTP training "
                         f"does not implement; this batch spans {int(positions.max()) + 1} positions (masks "
                         f"included): train on shorter sequences (mtp train --max-length)")
    limit = rope_length_limit(model)
    # The layout's positions run past the sequence (its masks); a rotary embedding that rescales with the
    # furthest position would rotate the regular tokens differently from the model's own forward.
    if limit is not None and positions.numel() and int(positions.max()) + 1 >= limit:
        raise ValueError(f"this model's rotary embedding changes its frequencies from {limit} positions on, and "
                         f"this batch spans {int(positions.max()) + 1} (masks included): train on shorter "
                         f"sequences (mtp train --max-length)")


def mtp_forward(model, *args, mtp_batch: dict | None = None, loss_weights: LossWeights | None = None, **kwargs):
    """A patched model's `forward`: the class's forward, or with `mtp_batch=` (a collated batch) the MTP
    loss and its terms, `mtp_loss(model, mtp_batch, loss_weights)`.

    The loss has to run inside the forward of whatever wraps the model: DistributedDataParallel arms its
    gradient all-reduce in its forward and FSDP gathers parameters there, so a loss computed on the
    unwrapped model would train each rank on its own gradients without a word.
    """
    if mtp_batch is None:
        return type(model).forward(model, *args, **kwargs)
    if args or kwargs:
        raise TypeError(f"forward(mtp_batch=...) takes no other inputs, got {len(args)} positional and "
                        f"{sorted(kwargs)}")
    return mtp_loss(model, mtp_batch, loss_weights or LossWeights())


@contextlib.contextmanager
def _gate_as_it_was(model, gate):
    previous, model.mtp_gate.gate = model.mtp_gate.gate, gate
    try:
        yield
    finally:
        model.mtp_gate.gate = previous


def enable_gradient_checkpointing(model, every_n_layers: int = 1, offload: bool = False, **checkpoint_kwargs) -> None:
    """Activation checkpointing that recomputes each layer with the gate of its original forward.

    The gate lives in a context that is cleared when the forward returns, long before the backward pass
    recomputes the checkpointed layers; each checkpointed region therefore captures the gate in force
    when it first ran and restores it for its recomputation (which needs torch's non-reentrant checkpoint).
    transformers' own `activation_checkpointing_enable` / `gradient_checkpointing_enable` would recompute
    without LoRA: `mtp_loss` refuses to train under it, and `MTPTrainer` routes the `TrainingArguments`
    flag here. `every_n_layers`, `offload` and `checkpoint_kwargs` are those of transformers' method.
    """

    def context_fn():
        return contextlib.nullcontext(), _gate_as_it_was(model, model.mtp_gate.gate)

    kwargs = checkpoint_kwargs | {"use_reentrant": False, "context_fn": context_fn}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in newer transformers; the old one warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers,
                                              offload=offload)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers,
                                            offload=offload)
    model._mtp_checkpoint_functions = _checkpoint_functions(model)


def _checkpoint_functions(model) -> list:
    """The checkpoint function of every decoder layer that checkpoints (transformers keeps one per layer)."""
    return [getattr(layer, "_gradient_checkpointing_func", None) for layer in model.model.layers
            if getattr(layer, "gradient_checkpointing", False)]


def _check_checkpointing(model) -> None:
    functions = _checkpoint_functions(model)
    if model.training and functions and functions != getattr(model, "_mtp_checkpoint_functions", None):
        raise RuntimeError(
            "activation checkpointing of a patched model must be enabled with "
            "mtp_model.training.enable_gradient_checkpointing(model) (or TrainingArguments(gradient_checkpointing="
            "True) with MTPTrainer): transformers' own method recomputes the layers without the adapter's gate, "
            "so the gradients would be wrong"
        )


class TimeLimit(TrainerCallback):
    """Ends training at the first optimizer step after `minutes` of it, with a checkpoint, as if that step
    were `max_steps`: a run sized by the clock (a lent GPU's minutes, a CPU budget) rather than by a
    step count. The learning rate schedule still runs to `max_steps`, so a decaying one is cut where it
    stands: pair it with a constant rate."""

    def __init__(self, minutes: float):
        if not minutes > 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        self.seconds = 60.0 * minutes
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and time.monotonic() - self.start >= self.seconds:
            control.should_training_stop = True
            control.should_save = True


class _CollatorEpoch(TrainerCallback):
    """Tells the collator the epoch it collates for, before the epoch's data loader starts."""

    def __init__(self, collator: MTPDataCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)


class MTPTrainer(Trainer):
    """`transformers.Trainer` with the MTP loss, per-term logging and adapter checkpoints.

    Pass a model patched with `mtp_model.patch` and an `MTPDataCollator`; `remove_unused_columns` is turned
    off (the collator needs `loss_mask`). A checkpoint directory holds the
    adapter (`adapter_config.json`, `adapter_model.safetensors`, loadable by `mtp_model.patch(model,
    adapter=...)`) with the Trainer's optimizer and scheduler state, not the frozen base model; resuming
    loads the adapter back. Logs add each loss term, the layout tokens per second since the
    last log and the process's peak resident memory so far (what a layout and batch size cost).
    """

    def __init__(self, *args, loss_weights: LossWeights | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not is_patched(self.accelerator.unwrap_model(self.model)):
            raise ValueError("MTPTrainer trains a model patched with mtp_model.patch")
        # The collator needs its columns (loss_mask): the Trainer would drop what forward does not name.
        self.args.remove_unused_columns = False
        # compute_loss returns each micro-batch's mean: the Trainer must divide it by the accumulation steps
        # (it would not for a model it takes to normalise by num_items_in_batch, as a forward with **kwargs).
        self.model_accepts_loss_kwargs = False
        # The Trainer would enable transformers' checkpointing, which recomputes layers without the gate.
        flags = [name for name in ("activation_checkpointing", "gradient_checkpointing") if getattr(self.args, name, False)]
        if flags:
            options = dict(getattr(self.args, "activation_checkpointing_kwargs", None)
                           or getattr(self.args, "gradient_checkpointing_kwargs", None) or {})
            enable_gradient_checkpointing(self.model, **options)
            for name in flags:
                setattr(self.args, name, False)
        self.loss_weights = loss_weights or LossWeights()
        if isinstance(self.data_collator, MTPDataCollator):
            self.add_callback(_CollatorEpoch(self.data_collator))
        self._term_sums: dict[str, float] = {}
        self._term_count = 0
        self._layout_tokens = 0
        self._since = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, terms = model(mtp_batch=inputs, loss_weights=self.loss_weights)  # through DDP / FSDP wrappers
        if model.training:  # the training log's terms: evaluation batches have their own log
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value
            self._term_count += 1
            self._layout_tokens += int(inputs["valid"].sum())
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if self._term_count and "loss" in logs:
            logs.update({name: total / self._term_count for name, total in self._term_sums.items()})
            now = time.perf_counter()
            logs["layout_tokens_per_second"] = round(self._layout_tokens / max(now - self._since, 1e-9), 1)
            logs["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            self._term_sums, self._term_count, self._layout_tokens, self._since = {}, 0, 0, now
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        # Checkpoints and save_model hold the adapter and the training arguments, not the frozen base model
        # (which patch never changes): megabytes instead of the whole model at every checkpoint.
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            save_adapter(self.accelerator.unwrap_model(self.model), output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def train(self, resume_from_checkpoint=None, **kwargs):
        # Resumed from a checkpoint already at max_steps, the Trainer's loop takes one more step before it
        # checks the limit: a finished run would not stay finished. Load it and stop instead.
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)) and self.args.max_steps > 0:
            state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
            if state.global_step >= self.args.max_steps:
                self._load_from_checkpoint(str(checkpoint))
                self.state = state
                return TrainOutput(state.global_step, 0.0, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        load_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)


def end_distributed_process() -> None:
    """Ends a process of a torchrun job once everything it makes is written; nothing when not under one.

    A barrier first, so that no rank leaves while another is still in a collective; then the process exits
    at once, skipping the interpreter's teardown, because gloo's teardown deadlocks now and then:
    destroying the last reference to a `ProcessGroupGloo` (the DDP reducer's, as the Trainer goes) joins its
    worker threads while the caller holds the GIL, and a worker thread releasing a finished collective, whose
    tensors Python owns, waits for that GIL (both stacks in benchmarks/results/README.md, "The DDP hang");
    left to the interpreter's exit, those threads can also abort the process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
