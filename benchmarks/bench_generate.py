"""End-to-end greedy generation: MTP against stock `generate` and stock prompt-lookup decoding.

Batch 1, 4 and 16; tokens per second and tokens per step go to extra_info. On CPU the model is a tiny
random Llama (random weights: drafts are rarely right, so this measures overhead, not speed-up); on a GPU
a Llama-3-8B-shaped random model in bf16 (2 layers by default: the per-layer cost is what matters for the
step-cost ratio), plus the step-cost ratio: the time of one k=8 verify step over one plain decode step.
Target for that ratio at batch 1: at most 1.2.
"""

import time

import pytest
import torch
from common import DEVICE, DTYPE, ON_GPU, check_target, grid, run
from transformers import LlamaConfig, LlamaForCausalLM

import mtp_model
from mtp_model.attention import MTPCache
from mtp_model.decoding import Decoder
from mtp_model.layout import step_layout

BATCHES = grid([1, 4, 16], [1, 4])
NEW_TOKENS = grid(128, 16)
PROMPT = grid(256, 16)


def model_config():
    if ON_GPU:
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    stock = LlamaForCausalLM(model_config()).to(DEVICE, DTYPE).eval()
    patched = LlamaForCausalLM(model_config()).to(DEVICE, DTYPE).eval()
    patched.load_state_dict(stock.state_dict())
    mtp_model.patch(patched, mtp_model.MTPConfig(num_masks=8, lora_rank=16))
    return stock, patched


def prompts(batch, vocab_size):
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab_size, (batch, PROMPT), generator=generator).to(DEVICE)


def record(benchmark, batch, tokens_per_step):
    if benchmark.stats:
        benchmark.extra_info["tokens_per_second"] = batch * NEW_TOKENS / benchmark.stats.stats.min
    benchmark.extra_info["tokens_per_step"] = tokens_per_step


@pytest.mark.parametrize("batch", BATCHES)
def test_stock_greedy(benchmark, models, batch):
    stock, _ = models
    ids = prompts(batch, stock.config.vocab_size)
    benchmark.group = f"generate B={batch}"
    run(benchmark, stock.generate, ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    record(benchmark, batch, 1.0)


@pytest.mark.parametrize("batch", [1])  # stock prompt lookup supports batch 1 only
def test_stock_prompt_lookup(benchmark, models, batch):
    stock, _ = models
    ids = prompts(batch, stock.config.vocab_size)
    benchmark.group = f"generate B={batch}"
    run(benchmark, stock.generate, ids, max_new_tokens=NEW_TOKENS, do_sample=False, prompt_lookup_num_tokens=8)


@pytest.mark.parametrize("batch", BATCHES)
def test_mtp_greedy(benchmark, models, batch):
    _, patched = models
    ids = prompts(batch, patched.config.vocab_size)
    benchmark.group = f"generate B={batch}"
    run(benchmark, patched.generate, ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    record(benchmark, batch, patched.mtp_stats["tokens_per_step"])


@pytest.mark.parametrize("batch", grid([1, 8, 32], [1]))
def test_step_cost_ratio(benchmark, models, batch):
    """Time of one k=8 quadratic verify step over one plain decode step, same model, same cache length."""
    _, patched = models
    decoder = Decoder(patched, num_masks=8, mode="quadratic", use_sampler=True, params=mtp_kernels_params(),
                       generator=None)
    layout = step_layout(8, 8, "quadratic", DEVICE)
    plain = torch.ones(1, 1, dtype=torch.bool, device=DEVICE)
    cache = MTPCache(len(patched.model.layers), batch, PROMPT + 2 * layout.size, DEVICE)
    cache.lengths.fill_(PROMPT)

    def forward(T, block_mask):
        ids = torch.zeros(batch, T, dtype=torch.long, device=DEVICE)
        positions = PROMPT + torch.arange(T, device=DEVICE).expand(batch, T)
        with torch.no_grad():
            decoder.forward(ids, positions, cache, block_mask)
        if ON_GPU:
            torch.cuda.synchronize()

    def seconds(T, block_mask, repeats=5):
        forward(T, block_mask)
        start = time.perf_counter()
        for _ in range(repeats):
            forward(T, block_mask)
        return (time.perf_counter() - start) / repeats

    benchmark.group = "step cost ratio"
    run(benchmark, forward, layout.size, layout.block_mask)
    ratio = seconds(layout.size, layout.block_mask) / seconds(1, plain)
    if batch == 1:
        check_target(benchmark, "step_cost_ratio", ratio, 1.2)
    else:
        benchmark.extra_info["step_cost_ratio"] = ratio


def mtp_kernels_params():
    from mtp_kernels import SamplingParams

    return SamplingParams()
