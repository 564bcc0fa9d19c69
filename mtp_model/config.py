"""MTPConfig: the adapter's hyper-parameters, saved with the adapter next to peft's LoRA fields."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DECODING_MODES = ("quadratic", "linear")


@dataclass
class MTPConfig:
    """What `mtp_model.patch` adds to a model.

    num_masks: k, the number of mask tokens (drafts per step). lora_rank / lora_alpha: gated LoRA on
    `target_modules` of every decoder layer, scaled by alpha / rank as in peft. decoding: the default
    `generate` mode ("quadratic": a mask block after every draft; "linear": one block at the end).
    generate_num_masks: masks per step `generate` uses by default, 1..num_masks (None: num_masks); on a
    machine where a verify step over many tokens costs much more than a plain one, fewer masks can be
    faster. `mtp eval --save-fastest` sets it and `decoding` to the fastest configuration it measured.
    generate_max_batch: `generate` speculates for batches of up to this many rows and hands larger ones to
    stock generate (None: every batch). A step multiplies (rows x tokens per step) rows at once, so past
    some batch size the forward is compute-bound and speculation costs more than it saves; where depends
    on the machine (`benchmarks/results/README.md` has a CPU's numbers).
    use_sampler: draft with the sampler head (False: plain LM head on the mask states, the ablation).
    draft_vocab_size: drafts come from this many tokens only (the adapter's `mtp.draft_tokens`, the most
    frequent in its training responses), so the draft chain reads that many rows of the LM head per draft
    instead of the whole vocabulary; verification keeps the full head, so output never changes. None: all.
    sampler_residual: the sampler's output is the mask state plus its correction, scaled by a learned factor
    that starts at 0 (the paper's sampler has no such path; with one, an untrained sampler drafts what the
    plain LM head on the mask state would, so a short training run starts from there).
    """

    num_masks: int = 8
    lora_rank: int = 16
    lora_alpha: float = 32.0
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    decoding: str = "quadratic"
    generate_num_masks: int | None = None
    generate_max_batch: int | None = None
    use_sampler: bool = True
    mask_init_std: float | None = None  # None: the std of the model's input embeddings
    draft_vocab_size: int | None = None
    sampler_residual: bool = False
    # Filled by `patch` from the model, checked when an adapter is loaded into another model.
    base_model: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.target_modules, str):  # one name, not its characters
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        check_int("num_masks", self.num_masks, low=1)
        check_int("lora_rank", self.lora_rank, low=1)
        if self.draft_vocab_size is not None:
            check_int("draft_vocab_size", self.draft_vocab_size, low=1)
        if self.generate_num_masks is not None:
            check_int("generate_num_masks", self.generate_num_masks, low=1, high=self.num_masks)
        if self.generate_max_batch is not None:
            check_int("generate_max_batch", self.generate_max_batch, low=1)
        check_finite_number("lora_alpha", self.lora_alpha)
        if self.mask_init_std is not None:
            check_finite_number("mask_init_std", self.mask_init_std, positive=True)
        if self.decoding not in DECODING_MODES:
            raise ValueError(f"decoding must be one of {DECODING_MODES}, got {self.decoding!r}")
        if not isinstance(self.sampler_residual, bool):
            raise ValueError(f"sampler_residual must be True or False, got {self.sampler_residual!r}")
        if not isinstance(self.use_sampler, bool):
            raise ValueError(f"use_sampler must be True or False, got {self.use_sampler!r}")
        if not self.target_modules or not all(isinstance(name, str) for name in self.target_modules):
            raise ValueError(f"target_modules must be projection names, got {self.target_modules!r}")
        unknown = set(self.target_modules) - set(ALL_PROJECTIONS)
        if unknown:
            raise ValueError(f"target_modules {sorted(unknown)} are not decoder projections {ALL_PROJECTIONS}")

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> MTPConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MTPConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """Refuses anything but an int (bool and float included: 2.0 masks is a caller's mistake) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def check_finite_number(name: str, value, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
