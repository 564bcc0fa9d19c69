"""`compile_step(model, **options)`: opt-in `torch.compile` of a patched model's decoding step.

What is compiled: the forward of every full verify-and-draft step, ids [B, T] and positions [B, T] (T
fixed by the call's number of masks and decoding mode) through the model's own decoder stack, the gated
LoRA and tree attention custom ops and the `MTPCache` writes, as one graph. The prefill (its length is the
prompt's) and linear decoding's shorter draftless steps run eagerly, as do the token choice and the draft
chain between forwards. `options` go to `torch.compile`; the default `dynamic=True` keeps the batch size,
the number of masks and the cache's capacity (which grows with what a call keeps) symbolic, so that they
do not each cost a compilation. The compiled step computes what the eager step computes, so output stays
stock output.

On the CPU the gated LoRA projections enter the graph as torch ops (`mtp_kernels.gated_lora_linear`
traces its reference there), which inductor fuses; `options={"freezing": True}` also lets it pack the
weights for oneDNN, but bakes them into the graph: after changing any weight, call `compile_step` again.

Why opt-in: compilation costs minutes on a small CPU, paid once per process and shape family, and on the
CPU the eager path (oneDNN on prepacked weights and `step_forward`) is still the faster one; what each
costs is in benchmarks/results/README.md ("The compiled step"). `compile_step(model, enabled=False)` (or
`unpatch`) drops it.
"""

from __future__ import annotations

import functools

import torch

from mtp_model.decoding import cache_keyword, run_decoder


def compile_step(model, enabled: bool = True, **options):
    """Makes `model.generate` run its full decoding steps through `torch.compile(**options)` (default
    `dynamic=True`); returns the model. `enabled=False` goes back to the eager step."""
    if not hasattr(model, "mtp_gate"):
        raise ValueError("compile_step needs a patched model: call mtp_model.patch(model, ...) first")
    if not enabled:
        if options:
            raise ValueError(f"compile_step(enabled=False) takes no torch.compile options, got {sorted(options)}")
        model.__dict__.pop("mtp_compiled_step", None)
        return model
    options.setdefault("dynamic", True)
    step = functools.partial(run_decoder, model, cache_keyword(model.model))
    model.mtp_compiled_step = torch.compile(step, **options)
    return model
