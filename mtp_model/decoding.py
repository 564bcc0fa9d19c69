"""MTP generation: prefill, then draft-and-verify steps until every row stops.

Shapes: input_ids / attention_mask [B, P] (left padding), k masks, T tokens per step (`layout.py`).

1. Prefill: the prompt followed by k mask tokens. The last prompt token's output is the first new token
   t0 (exactly what stock greedy produces); the masks' hidden states, through the sampler chain seeded
   with t0, give k drafts. Only the prompt's KV is kept.
2. Step: anchor (last emitted token) + k drafts + mask blocks (quadratic or linear layout). The regular
   outputs are the verifier's tokens; the longest matching prefix of drafts is accepted, plus the bonus
   token after it. The next drafts come from the mask block after the last accepted token, seeded with
   the bonus. Only the anchor's and the accepted drafts' KV is kept (`MTPCache.keep`). In linear
   decoding a rejection leaves no drafts (the only mask block followed the rejected one): when no row has
   drafts the step is just [anchor, m1..mk], which verifies one token and drafts k afresh.
Forwards run the model's own decoder stack, except on the CPU in fp32 (or bf16 where oneDNN runs it
natively), where `StepForward` (the same stack written out without transformers' per-layer plumbing) runs
them for the models it recognises.
Regular tokens never see mask tokens and their linears run without LoRA (gate 0), so their outputs are the
base model's (up to rounding: a step multiplies T rows at once, on the CPU through oneDNN's prepacked
weights, LM head included, where stock decoding multiplies one row): greedy output is stock greedy
output, and sampling follows the model's distribution through the lossless acceptance rule. Rows stop on
their own (EOS, max_new_tokens), exactly where stock generation stops, with the same padding after them.
MTP attention sees the whole sequence: for a model with a sliding attention window (Mistral; Qwen2 and
Qwen3 with use_sliding_window) a call whose sequences would outgrow the window goes to stock generate,
with a warning.

Arguments: `docs/generate_contract.md` is the contract. Stock's own signature binds them and stock's own
helpers merge the generation config and settle the length, so that what MTP honours means what it means
in stock; every other argument, field or bypassed hook that asks for something hands the call, unchanged,
to stock generate with one warning. The output tokens and the KV cache grow with what is generated
(amortised doubling), not with max_new_tokens.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from inspect import Parameter

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

import mtp_kernels
from mtp_kernels import derived
from mtp_kernels.cpu_linear import packing_applies
from mtp_kernels.sampler import SamplingParams, head_logits
from mtp_model import adapter as adapter_io
from mtp_model.attention import MTPCache
from mtp_model.config import DECODING_MODES, check_int
from mtp_model.layout import step_layout
from mtp_model.model_helpers import embed_tokens, gate_context, rope_length_limit, sliding_window
from mtp_model.modules import effective_gate
from mtp_model.step_forward import StepForward

# GenerationConfig fields MTP decoding implements with stock generation's meaning (docs/generate_contract.md).
HONOURED_FIELDS = frozenset({
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "return_dict_in_generate",
})
# Fields that say how stock's own loop runs (its cache, compilation, prefill chunks), not which tokens it
# picks: MTP runs its own loop and has no use for them.
LOOP_FIELDS = frozenset({"use_cache", "cache_config", "compile_config", "disable_compile", "max_cache_len",
                         "prefill_chunk_size"})
# generate's named parameters MTP takes; any other one that is set sends the call to stock generation.
HONOURED_PARAMETERS = frozenset({"inputs", "generation_config", "streamer"})


@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """Stock generate's output plus the MTP statistics of the call."""

    mtp_stats: dict | None = None


def mtp_generate(model, *args, num_masks: int | None = None, decoding: str | None = None,
                 use_sampler: bool | None = None, max_steps: int | None = None, max_batch: int | None = None,
                 generator: torch.Generator | None = None, **kwargs):
    """`model.generate` of a patched model: stock generate's parameters, positional or by keyword, with
    stock's meaning (its own signature binds them and its own helpers merge `generation_config` with the
    model's and check the lengths), plus:

    num_masks: drafts per step, 1..the adapter's k (default: the config's generate_num_masks, else k).
    decoding: "quadratic" or "linear" (default from the config). use_sampler: False drafts with the plain LM
    head on the mask states (ablation). max_steps: stop after this many forward passes (the paper's
    evaluation uses 100). max_batch: batches of more rows go to stock generate (default: the config's
    generate_max_batch, else no limit). generator: the torch.Generator for sampling.

    A call MTP cannot decode as asked (an option it does not implement, a model hook it would bypass, a
    sliding window it would outgrow, more rows than max_batch) goes to stock generate with one warning
    naming the reason.
    """
    model.mtp_stats = None
    num_masks, decoding, use_sampler, max_batch = _mtp_options(model, num_masks, decoding, use_sampler, max_steps,
                                                               max_batch, generator)
    signature = inspect.signature(type(model).generate)
    arguments = signature.bind(model, *args, **kwargs).arguments  # stock's positional order; its TypeErrors
    names = list(signature.parameters)
    arguments.pop(names[0])
    extra = dict(arguments.pop(names[-1], {})) if signature.parameters[names[-1]].kind is Parameter.VAR_KEYWORD else {}

    def hand_off(reason):
        return _stock_generate(model, reason, args, kwargs, generator)

    unsupported = [f"{name}={value!r}" for name, value in arguments.items()
                   if name not in HONOURED_PARAMETERS and value is not None and value is not False]
    if unsupported:
        return hand_off(f"MTP decoding does not support {', '.join(unsupported)}")
    user_config = arguments.get("generation_config")
    # Exactly as stock generate decides whether max_length is its default (it then counts new tokens).
    default_max_length = (extra.get("max_length") is None
                          and (user_config is None or user_config.max_length is None)
                          and model.generation_config.max_length is None)
    config, model_kwargs = model._prepare_generation_config(user_config, **extra)
    input_ids = arguments.get("inputs")
    if input_ids is None:
        input_ids = model_kwargs.pop("input_ids", None)
    attention_mask = model_kwargs.pop("attention_mask", None)
    unsupported = _unsupported_fields(config) + [
        f"{name}=..." for name, value in model_kwargs.items() if value is not None and not hasattr(config, name)]
    if input_ids is None:
        unsupported.append("a call without input_ids")
    if unsupported:
        return hand_off(f"MTP decoding does not support {', '.join(unsupported)}")
    hooks = _bypassed_hooks(model)
    if hooks:
        return hand_off(f"MTP decoding would not run {', '.join(hooks)}")

    eos = config.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    input_ids, attention_mask, caller_device = _check_prompt(model, input_ids, attention_mask, config.pad_token_id,
                                                             eos_ids)
    if max_batch is not None and input_ids.shape[0] > max_batch:
        return hand_off(f"this batch has {input_ids.shape[0]} rows, more than max_batch={max_batch}")
    prompt_length = input_ids.shape[1]
    model._prepare_generated_length(config, default_max_length, True, "input_ids", prompt_length, input_ids)
    model._validate_generated_length(config, prompt_length, default_max_length)  # stock's errors and warnings
    max_new_tokens = config.max_length - prompt_length
    window = sliding_window(model)
    longest = int(attention_mask.sum(1).max()) + max_new_tokens
    if window is not None and longest > window:
        # MTP attention sees the whole sequence; past the window that would no longer be this model's output.
        return hand_off(f"this model attends within a sliding window of {window} tokens, which MTP decoding does "
                        f"not implement, and this call's sequences reach {longest} tokens")
    limit, reach = rope_length_limit(model), longest + 2 * num_masks  # a step's masks run 2k past its anchor
    if limit is not None and reach >= limit:
        return hand_off(f"this model's rotary embedding changes its frequencies from {limit} positions on, which "
                        f"MTP's forwards, reaching {reach} positions here, would cross before stock's")
    adapter_io.check_finite(adapter_io.adapter_tensors(model), "the MTP adapter")
    params = _sampling_params(config)
    # Stock's choice: the pad token, else the first EOS token.
    pad_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)

    # Weights edited without a version bump (through .data, by a fused optimizer) since the last call.
    with derived.refreshed(), torch.no_grad():
        decoder = Decoder(model, num_masks=num_masks, mode=decoding, use_sampler=use_sampler, params=params,
                          generator=generator)
        sequences, stats = decoder.run(input_ids, attention_mask, max_new_tokens, eos_ids, pad_id,
                                       arguments.get("streamer"), max_steps)
    sequences = sequences.to(caller_device)
    model.mtp_stats = stats
    if config.return_dict_in_generate:
        return MTPGenerateOutput(sequences=sequences, mtp_stats=stats)
    return sequences


def _mtp_options(model, num_masks, decoding, use_sampler, max_steps, max_batch, generator):
    """The MTP-only options, checked whether or not the call is then handed to stock generation."""
    mtp_config = model.mtp_config
    if num_masks is None:
        num_masks = mtp_config.generate_num_masks or mtp_config.num_masks
    check_int("num_masks", num_masks, low=1, high=mtp_config.num_masks)
    decoding = mtp_config.decoding if decoding is None else decoding
    if decoding not in DECODING_MODES:
        raise ValueError(f"decoding mode must be one of {DECODING_MODES}, got {decoding!r}")
    use_sampler = mtp_config.use_sampler if use_sampler is None else use_sampler
    if not isinstance(use_sampler, bool):
        raise ValueError(f"use_sampler must be True or False, got {use_sampler!r}")
    if max_steps is not None:
        check_int("max_steps", max_steps, low=1)
    max_batch = mtp_config.generate_max_batch if max_batch is None else max_batch
    if max_batch is not None:
        check_int("max_batch", max_batch, low=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return num_masks, decoding, use_sampler, max_batch


@functools.cache
def _neutral_config() -> dict:
    """Every GenerationConfig field at the value that leaves stock generation plain (greedy or sampling, no
    processors, no extra outputs): a fresh config with stock's global defaults."""
    neutral = GenerationConfig()
    neutral.update(**neutral._get_default_generation_params(), defaults_only=True)
    return {name: value for name, value in vars(neutral).items()
            if not name.startswith("_") and name != "transformers_version"}


def _unsupported_fields(config: GenerationConfig) -> list[str]:
    """The merged config's fields that MTP does not implement and that are not at their neutral value."""
    return [f"{name}={value!r}" for name, neutral in _neutral_config().items()
            if name not in HONOURED_FIELDS | LOOP_FIELDS and _is_set(value := getattr(config, name, neutral), neutral)]


def _is_set(value, neutral) -> bool:
    """Whether a field's value asks for something its neutral value does not (None, False and 0 all mean
    "off": the model's own config writes output_attentions=False where a fresh one has None)."""
    return value != neutral and not (not value and not neutral)


def _bypassed_hooks(model) -> list[str]:
    """Forward hooks that MTP decoding would not run: it never calls the model's own forward, and it
    multiplies by the LM head's weight instead of calling the head. (Hooks inside the decoder run: MTP's
    forwards go through it, mask tokens included.)"""
    found = []
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        found.append("a global forward hook (register_module_forward_hook)")
    for name, module in (("the model", model), ("lm_head", model.lm_head)):
        if module._forward_hooks or module._forward_pre_hooks:
            found.append(f"a forward hook on {name}")
    return found


def _stock_generate(model, reason, args, kwargs, generator):
    """Hands a call MTP cannot decode as asked to the model's own generate, unchanged, saying why."""
    if generator is not None:
        reason += "; stock generation samples from torch's global random state: generator= is not used"
    warnings.warn(f"{reason}: handing this call to stock generate", stacklevel=4)  # the caller's line
    return type(model).generate(model, *args, **kwargs)


def _sampling_params(config: GenerationConfig) -> SamplingParams:
    if not config.do_sample:
        return SamplingParams()
    temperature = 1.0 if config.temperature is None else config.temperature
    if temperature <= 0:
        raise ValueError(f"do_sample=True needs temperature > 0, got {temperature}")
    return SamplingParams(temperature, config.top_k or None, config.top_p)  # top_k 0 means no top-k


def _check_prompt(model, input_ids, attention_mask, pad_id, eos_ids):
    """The prompt on the model's device (stock takes CPU inputs for a model elsewhere, and so does this;
    the sequences go back to the caller's device), checked, and its attention mask as 0/1: any nonzero
    value attends, as in stock; without one, stock's inference (the pad token's positions are padding when
    the prompt holds it and it is no EOS)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError("input_ids must be a [batch, length] tensor of token ids")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    device, caller_device = model.lm_head.weight.device, input_ids.device
    if caller_device != device and caller_device.type != "cpu":
        raise ValueError(f"input_ids is on {caller_device} but the model is on {device}")
    input_ids = input_ids.to(device)
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= model.config.vocab_size):
        raise ValueError(f"input_ids holds ids outside the vocabulary [0, {model.config.vocab_size})")
    if attention_mask is None:
        inferable = pad_id is not None and pad_id not in eos_ids and bool((input_ids == pad_id).any())
        attention_mask = input_ids != pad_id if inferable else torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    attention_mask = (attention_mask.to(device) != 0).long()
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("MTP generation needs left padding (pad tokens before the prompt); set padding_side='left'")
    if bool((attention_mask.sum(1) == 0).any()):
        raise ValueError("a row of attention_mask is all padding: every prompt needs at least one token")
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = int(attention_mask.sum(1).max())
    if limit is not None and longest > limit:
        raise ValueError(f"the prompt has {longest} tokens but the model allows at most {limit}")
    return input_ids, attention_mask, caller_device  # in the caller's integer dtype, as the streamer gets it


def cache_keyword(decoder) -> str:
    """The name the decoder's forward takes its KV cache under: transformers 5.23 renamed past_key_values
    to cache and warns on the old name; earlier 5.x releases know only the old one."""
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


def run_decoder(model, cache_argument, ids, positions, cache, block_mask):
    """The model's own decoder stack over [B, T] ids (masks included) at [B, T] positions, attending through
    `cache` (an `MTPCache`, passed as `cache_argument`: `cache_keyword(model.model)`, found once by the
    caller) under the [T, T] `block_mask` -> last hidden states [B, T, d]."""
    with gate_context(model, ids >= model.config.vocab_size):
        output = model.model(
            inputs_embeds=embed_tokens(model, ids),
            position_ids=positions,
            **{cache_argument: cache},
            use_cache=True,
            attention_mask=block_mask[None, None],  # a ready 4D mask: transformers builds none
            mtp_step=cache.step_attention(block_mask),
        )
    return output.last_hidden_state


class Decoder:
    """One generate call's state: the model, the step layout and the choice of tokens. Public for tests and
    benchmarks that drive its pieces (`forward`, `verify`, `draft`, `run`); users call `model.generate`."""

    def __init__(self, model, num_masks, mode, use_sampler, params, generator):
        self.model = model
        self.k = num_masks
        self.mode = mode
        self.use_sampler = use_sampler
        self.params = params
        self.generator = generator
        self.vocab_size = model.config.vocab_size
        self.lm_weight = model.lm_head.weight
        self.device = self.lm_weight.device
        # Drafts from a draft vocabulary read only its rows of the LM head; verification reads all of them.
        self.draft_tokens = model.mtp.draft_tokens
        self.sampler_weights = model.mtp.sampler.weights()
        self.draft_weight = self.lm_weight if self.draft_tokens is None else derived.derived(
            "draft-head", (self.lm_weight, self.draft_tokens), lambda: self.lm_weight[self.draft_tokens].contiguous())
        self.full_step = self.step_shape(num_masks)  # (layout, token template)
        # Linear decoding after a rejection has no drafts: when no row has any, the step is [anchor, m1..mk]
        # (k + 1 tokens instead of 2k + 1), which gives the same verified token and fresh drafts.
        self.draftless_step = self.step_shape(0) if mode == "linear" else None
        self.mask_ids = self.vocab_size + torch.arange(num_masks, device=self.device)
        self.cache_keyword = cache_keyword(model.model)
        # Decided once per call, so that the projections of every forward skip prepacked_linear's checks.
        self.step_forward = StepForward.build(model) if packing_applies(self.device, model.dtype) else None
        self.compiled_step = getattr(model, "mtp_compiled_step", None)  # `compile_step`: full steps only

    def step_shape(self, num_drafts):
        """A step's layout and its token ids [T] with the masks filled in (mask i = vocab_size + i - 1)."""
        layout = step_layout(num_drafts, self.k, self.mode, self.device)
        return layout, (self.vocab_size + layout.mask_number - 1).masked_fill(layout.mask_number == 0, 0)

    # --- one forward ----------------------------------------------------------------------------------

    def forward(self, ids, positions, cache, block_mask):
        """[B, T] ids (masks included) at [B, T] positions -> last hidden states [B, T, d]."""
        if self.compiled_step is not None and ids.shape[1] == self.full_step[0].size:
            return self.compiled_step(ids, positions, cache, block_mask)
        if self.step_forward is not None:
            gate = effective_gate(ids >= self.vocab_size)
            return self.step_forward(embed_tokens(self.model, ids), positions, cache, block_mask, gate)
        return run_decoder(self.model, self.cache_keyword, ids, positions, cache, block_mask)

    # --- choosing tokens ------------------------------------------------------------------------------

    def noise(self, *shape, width=None):
        width = self.vocab_size if width is None else width
        return torch.empty(*shape, width, device=self.device).exponential_(generator=self.generator)

    def verify(self, regular_hidden, drafts):
        """Regular outputs [B, n+1, d] and drafts [B, n] (-1: none) -> (accepted [B], next token [B])."""
        B, n1, _ = regular_hidden.shape
        if self.params.greedy:
            targets = mtp_kernels.choose_tokens(regular_hidden.reshape(B * n1, -1), self.lm_weight).view(B, n1)
            return mtp_kernels.accept_greedy(drafts, targets)
        logits = head_logits(regular_hidden, self.lm_weight)
        uniform = torch.rand(B, n1 - 1, device=self.device, generator=self.generator)
        return mtp_kernels.accept_sampling(logits, drafts, self.params, uniform, self.noise(B, n1))

    def first_token(self, hidden):
        noise = None if self.params.greedy else self.noise(hidden.shape[0])
        return mtp_kernels.choose_tokens(hidden, self.lm_weight, self.params, noise)

    def draft(self, seed_tokens, mask_hidden):
        """k drafts [B, k] from the mask states [B, k, d], the first one following `seed_tokens` [B]."""
        B, k, _ = mask_hidden.shape
        noise = None if self.params.greedy else self.noise(B, k, width=self.draft_weight.shape[0])
        if not self.use_sampler:  # ablation: the plain LM head on each mask state
            flat_noise = None if noise is None else noise.flatten(0, 1)
            chosen = mtp_kernels.choose_tokens(mask_hidden.flatten(0, 1), self.draft_weight, self.params,
                                               flat_noise).view(B, k)
            return chosen if self.draft_tokens is None else self.draft_tokens[chosen]
        return mtp_kernels.draft_chain(self.sampler_weights, self.model.get_input_embeddings().weight,
                                       self.draft_weight, seed_tokens, mask_hidden, self.params, noise,
                                       self.draft_tokens)

    # --- the loop -------------------------------------------------------------------------------------

    def run(self, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, streamer, max_steps):
        B, P = input_ids.shape
        k, device = self.k, self.device
        # The output and the cache grow with what is generated and kept, not with what max_new_tokens allows.
        headroom = min(max_new_tokens, 64)
        output = _Output(B, headroom, pad_id, device)
        stats = _Stats(k, self.mode)
        stream = _Stream(streamer, input_ids)
        cache = MTPCache(len(self.model.model.layers), B, P + self.full_step[0].size + headroom, device)
        cache.starts = P - attention_mask.sum(1)
        eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)

        # Prefill: prompt + k masks; the masks follow the last prompt token.
        prompt_positions = (torch.arange(P, device=device) - cache.starts[:, None]).clamp(min=0)
        anchor_position = prompt_positions[:, -1]
        ids = torch.cat([input_ids, self.mask_ids.expand(B, k)], dim=1)
        positions = torch.cat([prompt_positions, anchor_position[:, None] + 1 + torch.arange(k, device=device)], 1)
        causal = torch.ones(P + k, P + k, dtype=torch.bool, device=device).tril()
        hidden = self.forward(ids, positions, cache, causal)
        cache.keep(torch.arange(P, device=device).expand(B, P).contiguous(), P + k)
        anchor = self.first_token(hidden[:, P - 1])
        anchor_position = anchor_position + 1
        generated = torch.zeros(B, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        finished = self.emit(anchor[:, None], torch.ones(B, dtype=torch.long, device=device), output, generated,
                             finished, eos, max_new_tokens, stats, stream)
        drafts = self.draft(anchor, hidden[:, P:])

        while not bool(finished.all()) and (max_steps is None or stats.steps < max_steps):
            no_drafts = drafts[:, :1] < 0
            if self.draftless_step is not None and bool(no_drafts.all()):
                (layout, template), drafts = self.draftless_step, drafts[:, :0]
            else:
                layout, template = self.full_step
            regular, T = layout.regular, layout.size
            # A row without drafts in a step with drafts (linear decoding, batches) puts the k masks in its
            # draft slots: they sit at the masks' positions and see what a mask block after the anchor sees,
            # so the step gives it one verified token and k fresh drafts (the paper's "verified + k masks").
            ids = template.expand(B, T).clone()
            slots = torch.where(no_drafts, self.mask_ids[: drafts.shape[1]], drafts)
            ids[:, regular] = torch.cat([anchor[:, None], slots], dim=1)
            positions = anchor_position[:, None] + layout.position_offset
            cache.reserve(int(cache.lengths.max()) + T)
            hidden = self.forward(ids, positions, cache, layout.block_mask)

            accepted, bonus = self.verify(hidden[:, regular], drafts)
            emitted = torch.cat([drafts, bonus[:, None]], dim=1)
            emitted[rows, accepted] = bonus
            keep = torch.where(torch.arange(regular.shape[0], device=device) <= accepted[:, None], regular, -1)
            cache.keep(keep.masked_fill(finished[:, None], -1), T)

            mask_rows = layout.masks[accepted]  # [B, k], -1 where the last accepted has no block
            if drafts.shape[1]:
                mask_rows = torch.where(no_drafts, regular[1:], mask_rows)
            mask_hidden = hidden.gather(1, mask_rows.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
            finished = self.emit(emitted, accepted + 1, output, generated, finished, eos, max_new_tokens, stats,
                                 stream)
            # A finished row's position stays: its forwards no longer matter, and positions that ran on would
            # reach where a rotary embedding that scales with the sequence length changes for every row.
            anchor, anchor_position = bonus, anchor_position + (accepted + 1).masked_fill(finished, 0)
            # Linear decoding has a mask block only after the last draft: after a rejection -1 marks "no draft".
            drafts = self.draft(bonus, mask_hidden).masked_fill(mask_rows[:, :1] < 0, -1)

        sequences = torch.cat([input_ids, output.tokens[:, : int(generated.max())]], dim=1)
        stream.end(output, int(generated.max()))
        return sequences, stats.summary(cache_lengths=cache.lengths)

    def emit(self, tokens, counts, output, generated, finished, eos, max_new_tokens, stats, stream):
        """Appends each unfinished row's first counts[b] tokens [B, n], cut at EOS and at the budget."""
        B, n = tokens.shape
        index = torch.arange(n, device=tokens.device)
        counts = torch.minimum(counts, max_new_tokens - generated).masked_fill(finished, 0)
        if eos.numel():
            is_eos = torch.isin(tokens, eos) & (index < counts[:, None])
            first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, n + 1)
            counts = torch.minimum(counts, first_eos)
            finished = finished | is_eos.any(1)
        take = index < counts[:, None]
        output.reserve(int((generated + counts).max()))
        row_index = torch.arange(B, device=tokens.device)[:, None].expand(B, n)
        output.tokens[row_index[take], (generated[:, None] + index)[take]] = tokens[take]
        stats.record(counts)
        generated += counts
        finished = finished | (generated >= max_new_tokens)
        stream.advance(output, generated, finished)
        return finished


class _Output:
    """Each row's generated tokens, `tokens` [B, capacity] with pad after them; the capacity at least
    doubles when a step needs more (amortised), so it follows what is generated."""

    def __init__(self, batch_size: int, capacity: int, pad_id: int, device: torch.device):
        self.tokens = torch.full((batch_size, capacity), pad_id, dtype=torch.long, device=device)
        self.pad_id = pad_id

    def reserve(self, length: int) -> None:
        capacity = self.tokens.shape[1]
        if length > capacity:
            grown = self.tokens.new_full((self.tokens.shape[0], max(length, 2 * capacity)), self.pad_id)
            grown[:, :capacity] = self.tokens
            self.tokens = grown


class _Stream:
    """Gives a streamer what stock generation gives it: put(prompt [B, P]), then put([B]) once per generated
    position (a finished row's pad in its column), then end(). A position goes out once every unfinished
    row has its token there: rows accept different counts per step."""

    def __init__(self, streamer, input_ids: torch.Tensor):
        self.streamer, self.sent = streamer, 0
        if streamer is not None:
            streamer.put(input_ids.cpu())

    def advance(self, output: _Output, generated: torch.Tensor, finished: torch.Tensor) -> None:
        if self.streamer is not None:
            self._send(output, int(torch.where(finished, generated.max(), generated).min()))

    def end(self, output: _Output, length: int) -> None:
        if self.streamer is not None:
            self._send(output, length)
            self.streamer.end()

    def _send(self, output: _Output, ready: int) -> None:
        for column in output.tokens[:, self.sent : ready].t().cpu():
            self.streamer.put(column.clone())
        self.sent = max(self.sent, ready)


class _Stats:
    """Steps, tokens and the histogram of tokens per step, counted for the rows still generating."""

    def __init__(self, num_masks: int, mode: str):
        self.num_masks, self.mode = num_masks, mode
        self.steps = 0
        self.row_steps = 0
        self.tokens = 0
        self.histogram = [0] * (num_masks + 2)  # index n: steps in which a row emitted n tokens

    def record(self, counts: torch.Tensor) -> None:
        self.steps += 1
        for count in counts[counts > 0].tolist():
            self.row_steps += 1
            self.tokens += count
            self.histogram[count] += 1

    def summary(self, cache_lengths: torch.Tensor | None = None) -> dict:
        return {
            "num_masks": self.num_masks,
            "decoding": self.mode,
            "steps": self.steps,
            "tokens": self.tokens,
            "tokens_per_step": self.tokens / max(self.row_steps, 1),
            "tokens_per_step_histogram": {n: c for n, c in enumerate(self.histogram) if c},
            "cache_lengths": None if cache_lengths is None else cache_lengths.tolist(),
        }
