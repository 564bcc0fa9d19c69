"""MTP generation is lossless: token-for-token stock greedy output, for every family, k, mode and batch."""

import pytest
import torch
from helpers import EOS, FAMILIES, left_padded_prompts, randomize_adapter, stock_greedy, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtp_model
from mtp_model import decoding
from mtp_model.model_helpers import sliding_window


def generated_count(continuations):
    """Tokens stock generation produced: each row up to and including its first EOS."""
    total = 0
    for row in continuations.tolist():
        total += row.index(EOS) + 1 if EOS in row else len(row)
    return total


def patched(family="llama", num_masks=3, seed=0, **model_options):
    model = tiny_model(family, seed=seed, **model_options)
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=num_masks, lora_rank=4))
    return randomize_adapter(model, seed=seed)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("num_masks", [1, 3, 8])
@pytest.mark.parametrize("mode", ["quadratic", "linear"])
def test_greedy_matches_stock_with_padding(family, num_masks, mode):
    model = tiny_model(family, seed=num_masks)
    ids, mask = left_padded_prompts([5, 9, 2, 7], model.config.vocab_size, seed=num_masks)
    expected = stock_greedy(model, ids, mask, 24)  # before patching: the untouched model
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=num_masks, lora_rank=4))
    randomize_adapter(model, seed=num_masks)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, decoding=mode)
    assert torch.equal(out, expected)
    stats = model.mtp_stats
    assert stats["tokens"] == generated_count(expected[:, ids.shape[1] :])
    assert sum(n * c for n, c in stats["tokens_per_step_histogram"].items()) == stats["tokens"]


def test_batch_of_one_and_fewer_masks_than_trained():
    model = patched(num_masks=8, seed=3)
    ids, mask = left_padded_prompts([6], model.config.vocab_size, seed=3)
    expected = stock_greedy(model, ids, mask, 30)
    for num_masks in (1, 4, 8):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, num_masks=num_masks)
        assert torch.equal(out, expected)


def _oracle(monkeypatch, continuation, num_masks, last_wrong=False):
    """Makes every draft the stock continuation: what a perfect adapter would propose (batch 1). With
    `last_wrong`, each step's last draft is off by one token id, so exactly num_masks - 1 can be accepted."""
    emitted = {"count": 0}
    original_emit = decoding.Decoder.emit

    def emit(self, tokens, counts, output, generated, *args):
        finished = original_emit(self, tokens, counts, output, generated, *args)
        emitted["count"] = int(generated[0])
        return finished

    def draft(self, seed_tokens, mask_hidden):
        start = emitted["count"]
        upcoming = continuation[start : start + num_masks].tolist()
        upcoming += [0] * (num_masks - len(upcoming))
        if last_wrong:
            upcoming[-1] = (upcoming[-1] + 1) % self.vocab_size
        return torch.tensor([upcoming])

    monkeypatch.setattr(decoding.Decoder, "emit", emit)
    monkeypatch.setattr(decoding.Decoder, "draft", draft)


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
@pytest.mark.parametrize("num_masks", [1, 3, 8])
def test_perfect_drafts_give_k_plus_one_tokens_per_step(monkeypatch, mode, num_masks):
    model = patched(num_masks=num_masks, seed=5)
    ids, mask = left_padded_prompts([4], model.config.vocab_size, seed=5)
    steps = 4
    max_new_tokens = 1 + steps * (num_masks + 1)  # the prefill's token, then full steps
    expected = stock_greedy(model, ids, mask, max_new_tokens)
    _oracle(monkeypatch, expected[0, ids.shape[1] :], num_masks)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, decoding=mode)
    assert torch.equal(out, expected)
    assert model.mtp_stats["tokens_per_step_histogram"] == {1: 1, num_masks + 1: steps}
    assert model.mtp_stats["steps"] == 1 + steps


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
def test_after_a_rejection_the_next_drafts_follow_the_last_accepted_token(monkeypatch, mode):
    num_masks, rounds = 3, 4
    model = patched(num_masks=num_masks, seed=5)
    ids, mask = left_padded_prompts([4], model.config.vocab_size, seed=5)
    # Quadratic: every step accepts k - 1 drafts and has a mask block after the last accepted one, so the
    # next step has drafts again. Linear: the only mask block follows the rejected draft, so a step with k
    # masks after the accepted token (1 token, fresh drafts) comes between the steps that accept k - 1.
    tokens_per_round = num_masks if mode == "quadratic" else num_masks + 1
    max_new_tokens = 1 + rounds * tokens_per_round
    expected = stock_greedy(model, ids, mask, max_new_tokens)
    _oracle(monkeypatch, expected[0, ids.shape[1] :], num_masks, last_wrong=True)
    step_sizes = []
    forward = decoding.Decoder.forward
    monkeypatch.setattr(decoding.Decoder, "forward", lambda self, ids, *args: step_sizes.append(ids.shape[1])
                        or forward(self, ids, *args))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, decoding=mode)
    assert torch.equal(out, expected)
    histogram = model.mtp_stats["tokens_per_step_histogram"]
    assert histogram == ({1: 1, num_masks: rounds} if mode == "quadratic" else {1: 1 + rounds, num_masks: rounds})
    # Linear steps without drafts feed only [anchor, m1..mk].
    step_tokens = {(num_masks + 1) ** 2} if mode == "quadratic" else {2 * num_masks + 1, num_masks + 1}
    assert set(step_sizes[1:]) == step_tokens


def test_stops_at_eos_inside_an_accepted_run(monkeypatch):
    model = patched(num_masks=4, seed=7)
    ids, mask = left_padded_prompts([5], model.config.vocab_size, seed=7)
    free_run = stock_greedy(model, ids, mask, 20)[0, ids.shape[1] :]
    # Declare a token from the middle of a step's run to be EOS: stock stops right after it.
    eos = int(free_run[7])
    expected = stock_greedy(model, ids, mask, 20, eos_token_id=eos, pad_token_id=0)
    _oracle(monkeypatch, free_run, 4)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, expected)
    assert out.shape[1] < ids.shape[1] + 20


def test_rows_stop_on_their_own_with_several_eos_ids():
    model = patched(num_masks=3, seed=11)
    ids, mask = left_padded_prompts([3, 8, 5], model.config.vocab_size, seed=11)
    free_run = stock_greedy(model, ids, mask, 16)[:, ids.shape[1] :]
    eos_ids = [int(free_run[0, 3]), int(free_run[2, 9]), EOS]
    expected = stock_greedy(model, ids, mask, 16, eos_token_id=eos_ids, pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos_ids, pad_token_id=0)
    assert torch.equal(out, expected)


def test_cache_holds_prompt_plus_accepted_tokens(monkeypatch):
    model = patched(num_masks=3, seed=2)
    ids, mask = left_padded_prompts([4, 6], model.config.vocab_size, seed=2)
    captured = {}
    original_run = decoding.Decoder.run

    def run(self, *args):
        sequences, stats = original_run(self, *args)
        captured.update(stats)
        return sequences, stats

    monkeypatch.setattr(decoding.Decoder, "run", run)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    # Every emitted token but the last (the next step's anchor) is cached, after the padded prompt.
    assert captured["cache_lengths"] == [ids.shape[1] + 12 - 1] * 2
    assert out.shape == (2, ids.shape[1] + 12)


def test_sampling_with_top_k_one_is_greedy():
    model = patched(num_masks=3, seed=4)
    ids, mask = left_padded_prompts([5, 3], model.config.vocab_size, seed=4)
    expected = stock_greedy(model, ids, mask, 15)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=True, top_k=1, temperature=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(out, expected)


def test_sampling_is_reproducible_with_a_generator():
    model = patched(num_masks=3, seed=6)
    ids, mask = left_padded_prompts([5, 3], model.config.vocab_size, seed=6)

    def sample(seed):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                              temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(seed))

    first, again = sample(1), sample(1)
    assert torch.equal(first, again)
    assert first.shape == (2, ids.shape[1] + 12)
    assert int(first[:, ids.shape[1] :].max()) < model.config.vocab_size


def test_return_dict_and_stats():
    model = patched(num_masks=3, seed=8)
    ids, mask = left_padded_prompts([5], model.config.vocab_size, seed=8)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True)
    assert torch.equal(out.sequences, stock_greedy(model, ids, mask, 10))
    assert out.mtp_stats == model.mtp_stats
    assert out.mtp_stats["tokens"] == 10
    assert out.mtp_stats["tokens_per_step"] >= 1.0


def test_streamer_receives_prompt_then_every_token():
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    model = patched(num_masks=3, seed=9)
    ids, mask = left_padded_prompts([5], model.config.vocab_size, seed=9)
    streamer = Collect()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=11, streamer=streamer)
    assert streamer.ended
    assert sum(streamer.chunks, []) == out[0].tolist()


def test_unsupported_options_go_to_stock_generate_with_a_warning():
    model = patched(num_masks=3, seed=10)
    ids, mask = left_padded_prompts([5], model.config.vocab_size, seed=10)
    with pytest.warns(UserWarning, match="num_beams"):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=2, do_sample=False)
    expected = type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=2,
                                    do_sample=False)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("family", "options"), [
    ("mistral", {"sliding_window": 12}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1}),
])
def test_sequences_past_a_sliding_window_go_to_stock_generate(family, options):
    model = tiny_model(family, seed=13, **options)
    ids, mask = left_padded_prompts([4, 7], model.config.vocab_size, seed=13)
    within, past = stock_greedy(model, ids, mask, 5), stock_greedy(model, ids, mask, 16)
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=3, lora_rank=4))
    randomize_adapter(model, seed=13)
    assert sliding_window(model) == 12
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5)  # 7 + 5 tokens fit the window
    assert torch.equal(out, within) and model.mtp_stats is not None
    model.mtp_stats = None
    with pytest.warns(UserWarning, match="sliding window of 12 tokens"):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(out, past) and model.mtp_stats is None


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 4.0}, {"rope_type": "default"}])
def test_a_rotary_embedding_that_scales_with_length_goes_to_stock_before_mtp_would_cross_its_limit(rope):
    """Dynamic NTK scaling recomputes the frequencies from each forward's furthest position: MTP's forwards
    reach 2k past the sequence, so near the limit they would rotate differently from stock's."""
    options = {"max_position_embeddings": 32, "rope_parameters": {**rope, "rope_theta": 10000.0}}
    model = tiny_model("llama", seed=14, **options)
    ids, mask = left_padded_prompts([20, 12], model.config.vocab_size, seed=14)
    within, near = stock_greedy(model, ids, mask, 5), stock_greedy(model, ids, mask, 11)
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=3, lora_rank=4))
    randomize_adapter(model, seed=14)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5)  # reaches 20 + 5 + 6 = 31
    assert torch.equal(out, within) and model.mtp_stats is not None
    model.mtp_stats = None
    if rope["rope_type"] == "dynamic":
        with pytest.warns(UserWarning, match="rotary embedding changes its frequencies from 32 positions"):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=11)  # 31 for stock, 37 for MTP
        assert model.mtp_stats is None
    else:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=11)
        assert model.mtp_stats is not None
    assert torch.equal(out, near)


def test_models_without_a_sliding_window():
    assert sliding_window(patched("llama")) is None
    assert sliding_window(patched("qwen2")) is None  # use_sliding_window is off by default
    assert sliding_window(patched("mistral")) == 4096  # Mistral's default


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_masks": 9}, "num_masks"),
        ({"right_padding": True}, "left padding"),
        ({"too_long": True}, "allows at most"),
        ({"decoding": "cubic"}, "decoding mode"),
        ({"temperature": -1.0, "do_sample": True}, "temperature"),
        ({"top_p": 1.5, "do_sample": True}, "top_p"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    model = patched(num_masks=3, seed=12)
    ids, mask = left_padded_prompts([3, 5], model.config.vocab_size, seed=12)
    if kwargs.pop("right_padding", False):
        mask = mask.flip(1)
    if kwargs.pop("too_long", False):
        ids, mask = left_padded_prompts([300], model.config.vocab_size, seed=12)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **kwargs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    num_masks=st.integers(1, 5),
    mode=st.sampled_from(["quadratic", "linear"]),
    max_new_tokens=st.integers(1, 14),
    seed=st.integers(0, 10_000),
)
def test_property_lossless(family, heads, lengths, num_masks, mode, max_new_tokens, seed):
    model = tiny_model(family, seed=seed, heads=heads[0], kv_heads=heads[1], hidden_size=32, vocab_size=61)
    ids, mask = left_padded_prompts(lengths, model.config.vocab_size, seed=seed)
    expected = stock_greedy(model, ids, mask, max_new_tokens)
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=num_masks, lora_rank=2))
    randomize_adapter(model, seed=seed, std=0.3)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, decoding=mode)
    assert torch.equal(out, expected)
