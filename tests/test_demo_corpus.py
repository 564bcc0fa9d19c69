"""The demo corpus is deterministic and its held-out split never leaks into training."""

from mtp_model.demo import corpus


def test_split_by_file_is_disjoint_and_stable():
    train, heldout = corpus.stdlib_files("train"), corpus.stdlib_files("heldout")
    assert train and heldout and not set(train) & set(heldout)
    assert heldout == corpus.stdlib_files("heldout")


def test_math_problems_are_seeded_and_correct():
    pairs = corpus.math_pairs("heldout", 50)
    assert pairs == corpus.math_pairs("heldout", 50)
    assert not set(pairs) & set(corpus.math_pairs("train", 2000))
    for problem, solution in pairs:
        answer = int(solution.rsplit("The answer is ", 1)[1].rstrip("."))
        if problem.startswith("Compute "):
            assert eval(problem.removeprefix("Compute ").rstrip(".")) == answer


def test_prompt_pairs_cover_every_domain():
    pairs = corpus.prompt_pairs("heldout", 3)
    assert set(pairs) == set(corpus.DOMAINS)
    assert all(len(domain_pairs) == 3 and all(p and r for p, r in domain_pairs) for domain_pairs in pairs.values())
