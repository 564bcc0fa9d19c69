"""The demo corpus is deterministic, its held-out split never leaks into training, and its prompt/response
pairs are cut where the tokenizer cuts."""

import argparse

import pytest
from tokenizers import pre_tokenizers

from mtp_model.demo import corpus


def test_split_by_file_is_disjoint_and_stable():
    train, heldout = corpus.stdlib_files("train"), corpus.stdlib_files("heldout")
    assert train and heldout and not set(train) & set(heldout)
    assert heldout == corpus.stdlib_files("heldout")


def test_adapter_split_is_what_pretraining_never_read():
    adapter = corpus.stdlib_files("adapter")
    assert adapter and set(adapter) < set(corpus.stdlib_files("train"))
    pretraining = set(corpus.pretraining_text())
    for path in adapter[:: max(1, len(adapter) // 20)]:
        assert path.read_text(encoding="utf-8") not in pretraining, path
    function_prompts = [prompt for prompt, _ in corpus.prompt_pairs("adapter", 300)["code"]]
    assert not any(prompt in text for prompt in function_prompts[::30] for text in pretraining)
    problems = corpus.math_pairs("adapter", 3000)
    assert len(set(problems)) == len(problems)
    assert not set(problems) & (set(corpus.math_pairs("train", corpus.MATH_TRAIN_COUNT)) | set(corpus.math_pairs("heldout", 1000)))
    with pytest.raises(ValueError, match="'adapter' or the 'heldout'"):
        corpus.prompt_pairs("train", 10)


def test_heldout_math_is_seeded_correct_and_unseen_in_pretraining():
    pairs = corpus.math_pairs("heldout", 200)
    assert pairs == corpus.math_pairs("heldout", 200)
    assert not set(pairs) & set(corpus.math_pairs("train", corpus.MATH_TRAIN_COUNT))
    for problem, solution in pairs:
        answer = int(solution.rsplit("The answer is ", 1)[1].rstrip("."))
        if problem.startswith("Compute "):
            assert eval(problem.removeprefix("Compute ").rstrip(".")) == answer


def test_math_prompts_continue_like_the_pretraining_documents():
    (prompt, response), = corpus.prompt_pairs("adapter", 1)["math"]
    assert prompt + response == corpus.math_document(*corpus.math_pairs("adapter", 1)[0])


@pytest.mark.parametrize("split", ["adapter", "heldout"])
def test_pairs_split_at_a_pretokenizer_boundary(split):
    # BPE merges never cross pre-token boundaries, so a cut at one tokenizes apart exactly as joined.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pairs = corpus.prompt_pairs(split, 200)
    assert set(pairs) == set(corpus.DOMAINS)
    for domain, domain_pairs in pairs.items():
        assert len(domain_pairs) >= 100, domain  # held-out prose has about 160 in all
        for prompt, response in domain_pairs:
            assert prompt.strip() and response.strip(), (domain, prompt)
            assert not prompt[-1].isspace(), (domain, prompt)
            starts = {start for _, (start, _) in byte_level.pre_tokenize_str(prompt + response)}
            assert len(prompt) in starts, (domain, prompt, response[:40])


def test_tokenizer_is_lossless_and_loads_with_from_pretrained(tmp_path):
    from transformers import AutoTokenizer

    from mtp_model.demo import build

    documents = corpus.code_texts("train", 50_000) + [corpus.math_document(*p) for p in corpus.math_pairs("train", 200)]
    build.build_tokenizer(tmp_path, vocab_size=512, documents=documents)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 512
    assert [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token] == build.SPECIAL_TOKENS
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    unseen = corpus.code_texts("heldout", 20_000) + ["caf\u00e9\t  x = '\u00fc\u2192'  \n\n\r\n", "Problem: Compute 7 + 8."]
    for text in unseen:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_adapter_pairs_take_one_count_or_one_per_domain():
    from mtp_model.demo.build import domain_counts

    assert domain_counts("7") == {"code": 7, "math": 7, "prose": 7}
    counts = domain_counts("code=3,math=5,prose=2")
    assert {domain: len(pairs) for domain, pairs in corpus.prompt_pairs("adapter", counts).items()} == counts
    with pytest.raises(argparse.ArgumentTypeError, match="each of code, math, prose"):
        domain_counts("code=3,math=5")
    with pytest.raises(ValueError, match="a count for each"):
        corpus.prompt_pairs("adapter", {"code": 3})
