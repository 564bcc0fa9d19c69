"""MTP adapters on disk, in peft's layout.

A directory with
- `adapter_config.json`: peft's LoRA fields (peft_type, r, lora_alpha, target_modules, ...) plus an
  "mtp" entry holding the full `MTPConfig` (with the facts of the base model it was trained on);
- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` as peft
  names them, and `base_model.model.mtp.*` for the mask embeddings and the sampler head.
The LoRA factors therefore also load with `peft.PeftModel.from_pretrained` (as ungated LoRA).
Adapters that ship with the package live in `mtp_model/adapters/<name>` and are found by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtp_model.config import MTPConfig
from mtp_model.model_helpers import describe_model, is_patched

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
SHIPPED_DIR = Path(__file__).resolve().parent / "adapters"
ADAPTER_SUBDIR = "mtp_adapter"  # where a patched model's save_pretrained puts its adapter
# What an adapter's config must state (`load_config`), and the base-model facts an adapter must match.
REQUIRED_FIELDS = ("num_masks", "lora_rank", "lora_alpha", "target_modules", "base_model")
FITTING_FACTS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def adapter_tensors(model) -> dict:
    """The adapter's tensors of a patched model by state-dict name: LoRA factors, mask embeddings, sampler."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if ".lora_A." in name or ".lora_B." in name or name.startswith("mtp.")
    }


def save_adapter(model, path: str | Path) -> Path:
    """Writes the adapter of a patched model to directory `path` (created if needed)."""
    if not is_patched(model):
        raise ValueError("save_adapter needs a model patched with mtp_model.patch")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.mtp_config
    peft_fields = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.base_model.get("name_or_path", ""),
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": list(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "mtp": config.to_dict(),
    }
    (path / CONFIG_FILE).write_text(json.dumps(peft_fields, indent=2) + "\n")
    tensors = {PEFT_PREFIX + name: t.detach().contiguous().cpu() for name, t in adapter_tensors(model).items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def save_pretrained(model, save_directory: str | Path, is_main_process: bool = True, state_dict: dict | None = None,
                    **kwargs):
    """A patched model's `save_pretrained`: stock's, of the base model in its stock layout (the projections'
    weights under their own names, nothing of MTP), so `from_pretrained` loads it as the model it was; and
    the adapter in `<save_directory>/mtp_adapter`, for `patch(model, adapter=...)`. Stock's other arguments
    pass through; a given `state_dict` is saved as it is."""
    if state_dict is None:
        adapter = adapter_tensors(model)
        state_dict = {name.replace(".base_layer.", "."): tensor for name, tensor in model.state_dict().items()
                      if name not in adapter}
    type(model).save_pretrained(model, save_directory, is_main_process=is_main_process, state_dict=state_dict,
                                **kwargs)
    if is_main_process:
        save_adapter(model, Path(save_directory) / ADAPTER_SUBDIR)


def check_finite(tensors: dict, owner: str) -> None:
    """Refuses adapter tensors holding a NaN or an infinity, naming the first such tensor: one such value in
    a LoRA factor or the sampler would spread to every token the adapter touches."""
    floats = {name: tensor for name, tensor in tensors.items() if tensor.is_floating_point()}
    # One fused pass first (0 x NaN and 0 x inf are NaN, 0 x a finite value is 0); the names only on failure.
    zeros = torch._foreach_mul(list(floats.values()), 0.0)
    if not floats or bool(torch.stack(torch._foreach_norm(zeros)).isfinite().all()):
        return
    for name, tensor in floats.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{owner} holds non-finite values (NaN or infinity) in {name}")


def shipped_adapters() -> list[str]:
    """Names of the adapters that ship inside the package (`patch(model, adapter=name)` finds them)."""
    return sorted(entry.name for entry in SHIPPED_DIR.iterdir() if (entry / CONFIG_FILE).is_file()) \
        if SHIPPED_DIR.is_dir() else []


def resolve(name_or_path: str | Path) -> Path:
    """A directory as given, or the shipped adapter of that name."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) in shipped_adapters():
        return SHIPPED_DIR / str(name_or_path)
    raise ValueError(f"{name_or_path} is neither an adapter directory nor a shipped adapter "
                     f"({', '.join(shipped_adapters()) or 'none in this package'})")


def load_config(path: str | Path) -> MTPConfig:
    path = resolve(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{path} is not an MTP adapter: {CONFIG_FILE} is missing")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or "mtp" not in data:
        raise ValueError(f"{config_file} is a plain peft adapter without an 'mtp' entry, not an MTP adapter")
    saved = data["mtp"]
    # A missing field would silently take its default (a LoRA scaled by another alpha, an adapter that
    # fits any model): the ones every saved adapter has must be there. Newer optional fields may be absent.
    missing = [name for name in REQUIRED_FIELDS if not isinstance(saved, dict) or name not in saved]
    if missing:
        raise ValueError(f"{config_file}: the 'mtp' entry lacks {', '.join(missing)}")
    base = saved["base_model"]
    if not isinstance(base, dict) or any(key not in base for key in FITTING_FACTS):
        raise ValueError(f"{config_file}: 'base_model' must give the base model's {', '.join(FITTING_FACTS)}")
    return MTPConfig.from_dict(saved)


def set_generation_defaults(path: str | Path, num_masks: int, decoding: str) -> MTPConfig:
    """Rewrites the masks per step and the decoding mode that `generate` uses by default with the adapter
    at `path` (the weights are untouched), e.g. to the fastest configuration `mtp eval` measured."""
    config = load_config(path)  # refuses a directory that holds no MTP adapter
    config = MTPConfig.from_dict(config.to_dict() | {"generate_num_masks": num_masks, "decoding": decoding})
    config_file = resolve(path) / CONFIG_FILE
    data = json.loads(config_file.read_text()) | {"mtp": config.to_dict()}
    config_file.write_text(json.dumps(data, indent=2) + "\n")
    return config


def check_fits(config: MTPConfig, model) -> None:
    """Refuses an adapter trained for a model that differs from `model` in what the adapter depends on."""

    expected, actual = config.base_model, describe_model(model)
    differences = [
        f"{key}: adapter {expected[key]!r}, model {actual[key]!r}"
        for key in FITTING_FACTS
        if key in expected and expected[key] != actual[key]
    ]
    if differences:
        raise ValueError("the adapter does not fit this model (" + "; ".join(differences) + ")")


def load_weights(model, path: str | Path) -> None:
    """Loads the adapter tensors at `path` into a model patched with the adapter's config."""
    tensors = _read_tensors(path)
    expected = adapter_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the adapter at {path} does not fit this model: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"the adapter at {path} does not fit this model: {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )
    if "mtp.draft_tokens" in tensors:
        from mtp_model.modules import check_draft_tokens

        check_draft_tokens(tensors["mtp.draft_tokens"], model.config.vocab_size, f"the adapter at {path}'s draft_tokens")
    model.load_state_dict(tensors, strict=False)


def warm_start(model, path: str | Path) -> list[str]:
    """Starts training from another adapter: loads each of its tensors that `model` (patched for the new run)
    has under the same name and shape, and returns the names of the model's adapter tensors left at their
    initial values (new parts, such as a residual sampler's scale). The two adapters must agree on the
    base model, the number of masks, the LoRA rank and the target modules: otherwise most tensors would not
    carry over, and that is refused rather than silently trained from scratch."""
    path = resolve(path)
    config = load_config(path)
    check_fits(config, model)
    mine = model.mtp_config
    for field in ("num_masks", "lora_rank", "target_modules"):
        if getattr(config, field) != getattr(mine, field):
            raise ValueError(f"cannot start from the adapter at {path}: its {field} is {getattr(config, field)!r}, "
                             f"this run's is {getattr(mine, field)!r}")
    saved = _read_tensors(path)
    expected = adapter_tensors(model)
    carried = {name: tensor for name, tensor in saved.items()
               if name in expected and tensor.shape == expected[name].shape}
    model.load_state_dict(carried, strict=False)
    return sorted(set(expected) - set(carried))


def _read_tensors(path: str | Path) -> dict:
    """The adapter's tensors at `path` by state-dict name (peft's prefix removed), refused when not finite."""
    weights_file = resolve(path) / WEIGHTS_FILE
    if not weights_file.is_file():
        raise ValueError(f"{weights_file} is missing")
    try:
        saved = load_file(str(weights_file))
    except Exception as error:  # safetensors' own error type, for a truncated or foreign file
        raise ValueError(f"{weights_file} is not a readable safetensors file ({error})") from None
    tensors = {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in saved.items()}
    check_finite(tensors, f"the adapter at {path}")
    return tensors
