"""mtp_kernels: framework-level ops for multi-token prediction, on plain tensors (no transformers import).

Each op runs compiled Triton (or the CUDA extension) on CUDA tensors and the torch reference on CPU
tensors; `MTP_KERNELS=interpret` runs the Triton kernels through Triton's interpreter instead
(see `mtp_kernels.backend`). `prepacked_linear` is the CPU's counterpart for decoding's short products:
oneDNN on weights packed once.
"""

from mtp_kernels import backend, reference
from mtp_kernels.cpu_linear import prepacked_linear
from mtp_kernels.gated_lora import gated_lora_linear
from mtp_kernels.kv_compact import kv_compact
from mtp_kernels.linear_cross_entropy import linear_cross_entropy
from mtp_kernels.sampler import SamplingParams, accept_greedy, accept_sampling, choose_tokens, draft_chain
from mtp_kernels.tree_attention import tree_attention

__all__ = [
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
    "reference",
    "tree_attention",
]
