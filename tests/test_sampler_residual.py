"""The residual sampler (MTPConfig.sampler_residual): at its start it drafts what the plain LM head on the
mask states drafts, the draft chain op agrees with the module, output stays stock's, and it round-trips."""

import pytest
import torch
from helpers import left_padded_prompts, randomize_adapter, tiny_model

import mtp_kernels
import mtp_model


def patched(residual=True, seed=0):
    model = tiny_model(seed=seed)
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=3, lora_rank=4, sampler_residual=residual))
    return model


def test_an_untrained_residual_sampler_drafts_like_the_plain_head():
    model = randomize_adapter(patched())
    with torch.no_grad():
        model.mtp.sampler.residual_scale.zero_()  # randomize_adapter moved it; the start is 0
    ids, mask = left_padded_prompts([6, 3], model.config.vocab_size, seed=1)
    stats = []
    for use_sampler in (True, False):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, use_sampler=use_sampler)
        stats.append(model.mtp_stats["tokens_per_step_histogram"])
    assert stats[0] == stats[1]
    features = torch.randn(5, 2 * model.config.hidden_size)
    torch.testing.assert_close(model.mtp.sampler(features), features[:, model.config.hidden_size:])


def test_the_chain_op_agrees_with_the_module_and_output_stays_stocks():
    model = randomize_adapter(patched(seed=2), seed=2)
    sampler, d = model.mtp.sampler, model.config.hidden_size
    assert float(sampler.residual_scale.detach()) != 0.0
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    first, latents = torch.tensor([4, 9]), torch.randn(2, 3, d)
    with torch.no_grad():
        drafts = mtp_kernels.draft_chain(sampler.weights(), embed, head, first, latents)
        previous = first
        for j in range(3):  # the chain, step by step through the module
            hidden = sampler(torch.cat([embed[previous], latents[:, j]], dim=-1))
            previous = (hidden @ head.T).argmax(-1)
            assert torch.equal(previous, drafts[:, j]), j
    ids, mask = left_padded_prompts([5, 8], model.config.vocab_size, seed=3)
    stock = type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12), stock)


def test_the_residual_scale_trains_and_round_trips(tmp_path):
    model = randomize_adapter(patched(seed=4), seed=4)
    assert model.mtp.sampler.residual_scale.requires_grad
    mtp_model.save_adapter(model, tmp_path)
    loaded = mtp_model.patch(tiny_model(seed=4), adapter=tmp_path)
    assert loaded.mtp_config.sampler_residual
    assert torch.equal(loaded.mtp.sampler.residual_scale, model.mtp.sampler.residual_scale)
    plain = patched(residual=False)
    assert plain.mtp.sampler.residual_scale is None and "mtp.sampler.residual_scale" not in plain.state_dict()


def test_training_can_switch_to_the_residual_sampler_from_a_plain_adapter(tmp_path):
    trained = randomize_adapter(patched(residual=False, seed=5), seed=5)
    mtp_model.save_adapter(trained, tmp_path)
    model = patched(residual=True, seed=6)
    fresh = mtp_model.adapter.warm_start(model, tmp_path)
    assert fresh == ["mtp.sampler.residual_scale"] and float(model.mtp.sampler.residual_scale.detach()) == 0.0
    carried = mtp_model.adapter.adapter_tensors(trained)
    for name, tensor in mtp_model.adapter.adapter_tensors(model).items():
        if name != "mtp.sampler.residual_scale":
            assert torch.equal(tensor, carried[name]), name
    # What would not carry over is refused, not trained from scratch under the old adapter's name.
    other = tiny_model(seed=6)
    mtp_model.patch(other, mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    with pytest.raises(ValueError, match="its num_masks is 3, this run's is 2"):
        mtp_model.adapter.warm_start(other, tmp_path)
    wider = tiny_model(seed=6, hidden_size=32)
    mtp_model.patch(wider, mtp_model.MTPConfig(num_masks=3, lora_rank=4))
    with pytest.raises(ValueError, match="does not fit this model.*hidden_size"):
        mtp_model.adapter.warm_start(wider, tmp_path)
