"""Draft vocabularies: drafts come from the adapter's draft tokens only, output stays stock's, the set
round-trips through the adapter format, and bad sets are refused."""

import pytest
import torch

import mtp_model
from mtp_model.data import most_frequent_tokens
from helpers import EOS, left_padded_prompts, randomize_adapter, tiny_model


def patched(draft_vocab_size, seed=0, decoding="quadratic", family="llama"):
    model = tiny_model(family, seed=seed)
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=3, lora_rank=4, decoding=decoding,
                                               draft_vocab_size=draft_vocab_size))
    return randomize_adapter(model, seed=seed)


@pytest.mark.parametrize("decoding", ["quadratic", "linear"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_output_is_stocks_with_a_draft_vocabulary(decoding, family):
    model = patched(40, decoding=decoding, family=family)
    model.mtp.set_draft_tokens(torch.arange(3, 43), model.config.vocab_size)
    ids, mask = left_padded_prompts([5, 9, 2], model.config.vocab_size, seed=1)
    stock = type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    ours = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(stock, ours)


def test_drafts_come_from_the_draft_vocabulary_only(monkeypatch):
    model = patched(7)
    allowed = torch.tensor([4, 9, 11, 20, 33, 50, 70])
    model.mtp.set_draft_tokens(allowed, model.config.vocab_size)
    seen = []
    from mtp_model import decoding

    original = decoding.Decoder.draft
    monkeypatch.setattr(decoding.Decoder, "draft", lambda self, *a: seen.append(original(self, *a)) or seen[-1])
    for do_sample in (False, True):
        ids, mask = left_padded_prompts([6, 3], model.config.vocab_size, seed=2)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=do_sample,
                       generator=torch.Generator().manual_seed(0))
    drafts = torch.cat([d.flatten() for d in seen])
    assert drafts.numel() and bool(torch.isin(drafts[drafts >= 0], allowed).all())


def test_the_whole_vocabulary_as_draft_vocabulary_drafts_as_without_one():
    ids, mask = left_padded_prompts([7], 96, seed=3)
    results = []
    for size in (None, 96):
        model = patched(size, seed=4)
        if size:
            model.mtp.set_draft_tokens(torch.arange(96), 96)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
        results.append(model.mtp_stats["tokens_per_step_histogram"])
    assert results[0] == results[1]


def test_the_draft_vocabulary_round_trips_through_the_adapter(tmp_path):
    model = patched(5)
    model.mtp.set_draft_tokens(torch.tensor([60, 3, 8, 1, 44]), model.config.vocab_size)
    mtp_model.save_adapter(model, tmp_path)
    loaded = mtp_model.patch(tiny_model(), adapter=tmp_path)
    assert loaded.mtp_config.draft_vocab_size == 5
    assert loaded.mtp.draft_tokens.tolist() == [1, 3, 8, 44, 60]


def test_bad_draft_vocabularies_are_refused(tmp_path):
    with pytest.raises(ValueError, match="draft_vocab_size must be"):
        mtp_model.MTPConfig(draft_vocab_size=0)
    with pytest.raises(ValueError, match="exceeds the model's vocabulary of 96"):
        mtp_model.patch(tiny_model(), mtp_model.MTPConfig(draft_vocab_size=97))
    model = patched(3)
    with pytest.raises(ValueError, match="repeated"):
        model.mtp.set_draft_tokens(torch.tensor([4, 4, 5]), 96)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.mtp.set_draft_tokens(torch.tensor([4, 5, 96]), 96)
    with pytest.raises(ValueError, match="holds 3 tokens; got 2"):
        model.mtp.set_draft_tokens(torch.tensor([4, 5]), 96)
    mtp_model.save_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.mtp.draft_tokens"] = torch.tensor([2, 2, 3])
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="draft_tokens holds repeated token ids"):
        mtp_model.patch(tiny_model(), adapter=tmp_path)


def test_most_frequent_tokens_counts_responses_only():
    examples = [{"input_ids": torch.tensor([5, 5, 5, 7, 7, 9]), "loss_mask": torch.tensor([0, 0, 0, 1, 1, 1]).bool()},
                {"input_ids": torch.tensor([9, 3]), "loss_mask": torch.tensor([1, 1]).bool()}]
    assert most_frequent_tokens(examples, 2, 12).tolist() == [7, 9]
    assert most_frequent_tokens(examples, 2, 12, always=(EOS,)).tolist() == [1, 7]
    assert most_frequent_tokens(examples, 5, 12).tolist() == [0, 1, 3, 7, 9]  # ties: the smaller ids
    with pytest.raises(ValueError, match="does not fit"):
        most_frequent_tokens(examples, 13, 12)


def test_a_draft_vocabulary_works_under_inference_mode():
    model = patched(30)
    ids, mask = left_padded_prompts([4], model.config.vocab_size, seed=5)
    with torch.inference_mode():
        stock = type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        for _ in range(2):  # the second call finds the draft head built by the first
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10), stock)
