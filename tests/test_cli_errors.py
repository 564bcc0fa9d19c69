"""The command line's errors: `mtp --help`, usage errors (exit 2, one line naming the option or the file and
line, found before any model is loaded), library errors as one line (exit 1), no ANSI codes when piped."""

import json
import sys

import pytest
import transformers

from helpers import tiny_model
from test_train_cli import WORDS, counting_records, saved_tiny_model, tiny_tokenizer, write_jsonl

import mtp_model
from mtp_model import cli
from mtp_model.cli import DEMO_MODEL_DIR, main
from mtp_model.data import read_jsonl
from mtp_model.evaluate import evaluate, read_prompts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    mtp_model.save_adapter(mtp_model.patch(tiny_model(vocab_size=len(WORDS)), mtp_model.MTPConfig(num_masks=2)), path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Usage errors must come before the model is loaded: loading one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the command's checks")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def usage_error(capsys, argv) -> str:
    """The one line a usage error (exit code 2) of `mtp argv` prints."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    printed = capsys.readouterr().err
    assert printed.startswith(f"mtp {argv[0]}: error: ") and printed.count("\n") == 1, printed
    return printed.strip()


def train_argv(model_dir, tmp_path, *options, data=None):
    data = data or write_jsonl(tmp_path / "data.jsonl", counting_records(4))
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "adapter"), *options]


def eval_argv(model_dir, adapter_dir, prompts, *options):
    return ["eval", "--model", str(model_dir), "--adapter", str(adapter_dir), "--prompts", str(prompts), *options]


# `mtp` itself


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_commands_and_exits_0(flag, capsys):
    assert main([flag]) == 0
    printed = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in printed


@pytest.mark.parametrize("argv", [[], ["bogus"]])
def test_no_or_unknown_command_is_a_usage_error(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: mtp")
    assert "mtp: error: " + ("unknown command 'bogus'" if argv else "no command given") in captured.err


# Option values, checked by argparse


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "must be >= 1, got 0"),
    ("--steps", "2.5", "expected an integer, got '2.5'"),
    ("--lr", "0", "must be > 0"),
    ("--lr", "nan", "must be > 0"),
    ("--batch", "0", "must be >= 1"),
    ("--rank", "0", "must be >= 1"),
    ("--num-masks", "0", "must be >= 1"),
    ("--max-length", "1", "must be >= 2"),
    ("--grad-accum", "0", "must be >= 1"),
    ("--save-steps", "0", "must be >= 1"),
    ("--warmup-steps", "-1", "must be >= 0"),
    ("--distill-max-new-tokens", "0", "must be >= 1"),
    ("--mask-decay", "0", "must be in (0, 1]"),
    ("--mask-decay", "1.5", "must be in (0, 1]"),
    ("--anchor-fraction", "0", "must be in (0, 1]"),
    ("--regular-weight", "-0.5", "must be in [0, 1]"),
    ("--regular-weight", "2", "must be in [0, 1]"),
    ("--alpha", "0", "must be > 0"),
    ("--seed", "-1", "must be in [0, "),
    ("--draft-vocab", "0", "must be >= 1"),
    ("--draft-vocab", str(len(WORDS) + 1), f"must be at most the model's vocabulary, {len(WORDS)}"),
])
def test_train_option_values_are_checked_before_loading(option, value, message, model_dir, tmp_path, capsys,
                                                         no_model_loading):
    line = usage_error(capsys, train_argv(model_dir, tmp_path, f"{option}={value}"))
    assert f"argument {option}: {message}" in line


@pytest.mark.parametrize("options, message", [
    (["--max-steps", "0"], "argument --max-steps: must be >= 1"),
    (["--repeats", "0"], "argument --repeats: must be >= 1"),
    (["--limit", "0"], "argument --limit: must be >= 1"),
    (["--per-domain", "0"], "argument --per-domain: must be >= 1"),
    (["--device", "nonsense"], "argument --device: "),
    (["--out", "/no/such/dir/results.json"], "argument --out: /no/such/dir is not a directory"),
])
def test_eval_option_values_are_checked_before_loading(options, message, model_dir, adapter_dir, tmp_path, capsys,
                                                       no_model_loading):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1 w2"}])
    assert message in usage_error(capsys, eval_argv(model_dir, adapter_dir, prompts, *options))


def test_demo_option_values_are_checked(capsys):
    assert "argument --max-new-tokens: must be >= 1" in usage_error(capsys, ["demo", "--max-new-tokens", "0"])


def test_missing_model_directory_is_a_usage_error(tmp_path, capsys, no_model_loading):
    line = usage_error(capsys, train_argv(tmp_path / "nowhere", tmp_path))
    assert "argument --model: " in line and "nowhere: no such directory" in line
    line = usage_error(capsys, train_argv(tmp_path, tmp_path))
    assert "not a model directory (no config.json)" in line


# Input files, read before the model


def test_missing_data_file_is_named(model_dir, tmp_path, capsys, no_model_loading):
    line = usage_error(capsys, train_argv(model_dir, tmp_path, data=tmp_path / "missing.jsonl"))
    assert line.endswith("missing.jsonl: No such file or directory")


def test_bad_json_line_is_named_before_loading(model_dir, tmp_path, capsys, no_model_loading):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "w1", "response": "w2"}) + "\n{not json\n")
    assert "data.jsonl:2: not valid JSON" in usage_error(capsys, train_argv(model_dir, tmp_path, data=data))


def test_non_utf8_line_is_named(model_dir, adapter_dir, tmp_path, capsys, no_model_loading):
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps({"prompt": "w1", "response": "w2"}).encode() + b'\n{"prompt": "w1 \xff"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xff at column 16\)"):
        read_jsonl(data)
    with pytest.raises(ValueError, match=r"data.jsonl:2: not UTF-8"):
        read_prompts(data)
    assert "data.jsonl:2: not UTF-8 text" in usage_error(capsys, train_argv(model_dir, tmp_path, data=data))
    assert "data.jsonl:2: not UTF-8 text" in usage_error(capsys, eval_argv(model_dir, adapter_dir, data))


def test_a_byte_order_mark_is_allowed(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "w1", "response": "w2"}).encode() + b"\n")
    assert read_jsonl(data) == [("w1", "w2")]


def test_empty_data_file_is_a_usage_error(model_dir, tmp_path, capsys, no_model_loading):
    data = tmp_path / "data.jsonl"
    data.write_text("\n")
    assert "data.jsonl: no training records" in usage_error(capsys, train_argv(model_dir, tmp_path, data=data))


def test_empty_prompt_file_is_a_usage_error(model_dir, adapter_dir, tmp_path, capsys, no_model_loading):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("")
    assert "prompts.jsonl: no prompts" in usage_error(capsys, eval_argv(model_dir, adapter_dir, prompts))
    with pytest.raises(ValueError, match="no prompts"):
        evaluate(mtp_model.patch(tiny_model(vocab_size=len(WORDS)), mtp_model.MTPConfig(num_masks=2)),
                 tiny_tokenizer(), [])


def test_malformed_messages_are_named(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1"}, {"messages": ["w1"]}])
    with pytest.raises(ValueError, match=r"p.jsonl:2: every message needs 'role' and 'content'"):
        read_prompts(prompts)
    write_jsonl(prompts, [{"prompt": 5}])
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected a 'prompt' string"):
        read_prompts(prompts)


def test_eval_adapter_is_checked_before_loading(model_dir, tmp_path, capsys, no_model_loading):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1 w2"}])
    line = usage_error(capsys, eval_argv(model_dir, tmp_path, prompts))
    assert "is not an MTP adapter: adapter_config.json is missing" in line


# --out of `mtp train`


def test_existing_adapter_is_not_overwritten_silently(model_dir, tmp_path, capsys, no_model_loading):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    line = usage_error(capsys, train_argv(model_dir, tmp_path))
    assert "already holds an adapter" in line and "--resume" in line and "--overwrite" in line
    assert "no checkpoint in" in usage_error(capsys, train_argv(model_dir, tmp_path, "--resume"))
    assert "not allowed with argument --resume" in usage_error(capsys, train_argv(model_dir, tmp_path, "--resume",
                                                                                  "--overwrite"))
    assert (out / "adapter_config.json").read_text() == "{}"


# Errors from the library while a command runs


def test_library_errors_are_one_line_with_exit_code_1(model_dir, tmp_path, capsys, monkeypatch):
    assert main(["convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"mtp convert-gguf: error: {tmp_path / 'missing.gguf'}: no such GGUF file\n"
    # Every response empty: found by tokenization, after the model is loaded.
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "w1", "response": ""}])
    with pytest.warns(UserWarning, match="empty response"):
        assert main(train_argv(model_dir, tmp_path, "--steps", "1", data=data)) == 1
    assert capsys.readouterr().err.splitlines()[-1] == ("mtp train: error: no usable training example "
                                                        "(all responses empty or cut off)")
    monkeypatch.setenv("MTP_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")])


# Colour


def test_bold_only_on_a_terminal_without_no_color(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert cli.bold("x") == "x"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli.bold("x") == "\033[1mx\033[0m"
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli.bold("x") == "x"


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "adapter" / "adapter_config.json").is_file(),
                    reason="this checkout has no built demo model (python -m mtp_model.demo.build)")
def test_piped_demo_prints_no_escape_codes(capsys):
    assert main(["demo", "--model", "demo-model", "--per-domain", "1", "--max-new-tokens", "8"]) == 0
    assert "\033" not in capsys.readouterr().out
