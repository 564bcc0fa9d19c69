"""mtp_kernels: framework-level ops for multi-token prediction, on plain tensors (no transformers import).

Each op is a torch custom op (`torch.ops.mtp_kernels.<name>`, with a fake implementation, so that
torch.compile(fullgraph=True) traces through it) behind a public function of the same name that validates
its inputs once. Inside, CUDA tensors run compiled Triton (or the CUDA extension) and CPU tensors the best
CPU implementation (`torch_ops`, SDPA, oneDNN on a packed LM head); `MTP_KERNELS=interpret` runs
the Triton kernels through Triton's interpreter instead (see `mtp_kernels.backend`). `prepacked_linear` is
the CPU's counterpart for decoding's short products: oneDNN on weights packed once. The tests'
oracle, `tests/reference.py`, defines what each op computes (in float64).
"""

from mtp_kernels import backend, torch_ops
from mtp_kernels.cpu_linear import prepacked_linear
from mtp_kernels.gated_lora import gated_lora_linear
from mtp_kernels.kv_compact import kv_compact
from mtp_kernels.linear_cross_entropy import linear_cross_entropy
from mtp_kernels.sampler import (SamplerWeights, SamplingParams, accept_greedy, accept_sampling, choose_tokens,
                                 draft_chain)
from mtp_kernels.tree_attention import tree_attention

__all__ = [
    "SamplerWeights",
    "SamplingParams",
    "accept_greedy",
    "accept_sampling",
    "backend",
    "choose_tokens",
    "draft_chain",
    "gated_lora_linear",
    "kv_compact",
    "linear_cross_entropy",
    "prepacked_linear",
    "torch_ops",
    "tree_attention",
]
