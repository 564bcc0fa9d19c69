"""mtp_model: patch a Hugging Face Llama / Qwen causal LM for lossless multi-token generation.

    model = mtp_model.patch(hf_model, adapter="path")   # or mtp_model.MTPConfig(...)
    out = model.generate(**inputs, max_new_tokens=256)  # stock greedy's tokens in fewer forward passes
"""

from mtp_model.adapter import save_adapter, set_generation_defaults
from mtp_model.compile_step import compile_step
from mtp_model.config import MTPConfig
from mtp_model.modules import GatedLoRALinear, SamplerHead
from mtp_model.patch import patch, unpatch

__all__ = ["GatedLoRALinear", "MTPConfig", "MTPTrainer", "SamplerHead", "compile_step", "patch", "save_adapter",
           "set_generation_defaults", "unpatch"]


def __getattr__(name):
    # The trainer pulls in transformers' Trainer (and accelerate), which generation does not need.
    if name == "MTPTrainer":
        from mtp_model.training import MTPTrainer

        return MTPTrainer
    raise AttributeError(f"module 'mtp_model' has no attribute {name!r}")
