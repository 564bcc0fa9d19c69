"""compile_step: the full decoding steps run as one torch.compile graph and give the eager steps' tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import left_padded_prompts, randomize_adapter, stock_greedy, tiny_model

import mtp_model


def _recording_backend(graphs):
    """A torch.compile backend that runs the captured graph as it is and remembers it."""

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return backend


def _patched(family="llama", num_masks=3):
    return randomize_adapter(mtp_model.patch(tiny_model(family), mtp_model.MTPConfig(num_masks=num_masks)))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["quadratic", "linear"])
def test_compiled_steps_give_stock_greedy_tokens(family, mode):
    model = _patched(family)
    ids, mask = left_padded_prompts([5, 9], model.config.vocab_size, seed=1)
    expected = stock_greedy(model, ids, mask, 20)
    graphs = []
    torch._dynamo.reset()
    mtp_model.compile_step(model, backend=_recording_backend(graphs), fullgraph=True)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, decoding=mode)
    assert torch.equal(out, expected)
    assert graphs, "no step went through the compiled graph"
    assert model.mtp_stats["steps"] > 1


def test_compiled_sampling_follows_the_eager_steps_draw_for_draw():
    model = _patched()
    ids, mask = left_padded_prompts([4, 7, 6], model.config.vocab_size, seed=2)
    options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=0.8,
                   top_k=20)
    eager = model.generate(**options, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    mtp_model.compile_step(model, backend="aot_eager", fullgraph=True)
    compiled = model.generate(**options, generator=torch.Generator().manual_seed(5))
    assert torch.equal(compiled, eager)


def test_one_graph_serves_a_growing_cache_and_other_mask_counts():
    """dynamic=True (the default): longer generations (the cache grows) and fewer masks reuse the graph."""
    model = _patched(num_masks=4)
    graphs = []
    torch._dynamo.reset()
    mtp_model.compile_step(model, backend=_recording_backend(graphs))
    ids, mask = left_padded_prompts([6, 3], model.config.vocab_size, seed=3)
    for max_new_tokens, num_masks in ((8, 4), (90, 4), (12, 2)):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             num_masks=num_masks)
        assert torch.equal(out, stock_greedy(model, ids, mask, max_new_tokens))
    assert len(graphs) == 1


def test_disabling_and_unpatching_drop_the_compiled_step():
    model = _patched()
    mtp_model.compile_step(model, backend="aot_eager")
    assert callable(model.mtp_compiled_step)
    mtp_model.compile_step(model, enabled=False)
    assert not hasattr(model, "mtp_compiled_step")
    mtp_model.compile_step(model, backend="aot_eager")
    mtp_model.unpatch(model)
    assert not hasattr(model, "mtp_compiled_step")


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match="needs a patched model"):
        mtp_model.compile_step(tiny_model())
    with pytest.raises(ValueError, match="takes no torch.compile options"):
        mtp_model.compile_step(_patched(), enabled=False, backend="aot_eager")
