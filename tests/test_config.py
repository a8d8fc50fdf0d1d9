"""common.load_config: Python config files, --key=value overrides, type and range checks, clear errors, --help."""
import glob
import os
import types
import typing
from dataclasses import dataclass

import pytest

import collect_pairs
import sample
import train_dpo
import train_grpo
import train_lm
import train_ppo
import train_rm
import train_sft
from common import RunConfig, UserError, config_help, field, load_config
from conftest import ROOT


@dataclass
class Demo(RunConfig):
    learning_rate: float = 1e-3  # the step size
    batch_size: int = 8  # sequences per step
    name: str = "run"  # a label
    flag: bool = False  # a switch
    mode: typing.Literal["a", "b"] = "a"  # one of two modes
    dropout: float = field(0.0, min=0, below=1)  # a share
    eval_interval: int = 50  # a shared key given another default keeps its declared range


def test_defaults_then_file_then_command_line(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("import math\nbatch_size = 32\nlearning_rate = 3e-4\n_private = 1\n")
    cfg = load_config(Demo, [str(cfg_file), "--batch_size=64", "--name=out/x", "--flag=True"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.name, cfg.flag) == (64, 3e-4, "out/x", True)
    assert cfg.max_iters == 1000  # a shared key keeps its default


def test_an_int_is_accepted_for_a_float_and_strings_may_be_unquoted_or_look_like_numbers():
    cfg = load_config(Demo, ["--learning_rate=1", "--name=123", "--mode='b'"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.name == "123"
    assert cfg.mode == "b"


def test_unknown_key_names_the_key_a_close_match_and_the_valid_keys(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'batchsize'; did you mean 'batch_size'\? valid keys: out_dir"):
        load_config(Demo, ["--batchsize=3"])
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("lerning_rate = 0.1\n")
    with pytest.raises(UserError, match=r"c.py: unknown config key 'lerning_rate'; did you mean 'learning_rate'"):
        load_config(Demo, [str(cfg_file)])


def test_wrong_type_and_bad_choice_name_the_key():
    with pytest.raises(UserError, match="batch_size must be int, got float 2.5"):
        load_config(Demo, ["--batch_size=2.5"])
    with pytest.raises(UserError, match="flag must be bool, got int 1"):
        load_config(Demo, ["--flag=1"])
    with pytest.raises(UserError, match=r"mode='c' is not one of 'a', 'b'"):
        load_config(Demo, ["--mode=c"])
    with pytest.raises(UserError, match=r"dtype='fp8' is not one of 'auto', 'float32'"):
        load_config(Demo, ["--dtype=fp8"])
    assert load_config(Demo, ["--device=cuda:1"]).device == "cuda:1"


def test_malformed_arguments_and_missing_files_are_one_line_errors():
    with pytest.raises(UserError, match="must look like --key=value"):
        load_config(Demo, ["--batch_size"])
    with pytest.raises(UserError, match="config file 'nope.py' not found"):
        load_config(Demo, ["nope.py"])
    err = UserError("x")
    assert str(err) == "error: x" and isinstance(err, SystemExit)


def test_help_lists_every_key_with_default_and_meaning(capsys):
    text = config_help(Demo, "demo.py")
    for line in ("--learning_rate=0.001", "the step size", "--batch_size=8", "sequences per step",
                 "--init_from='scratch'", "--mode='a'", "[a | b]", "--seed=1337"):
        assert line in text
    with pytest.raises(SystemExit) as exit_info:
        load_config(Demo, ["--help"])
    assert exit_info.value.code == 0
    assert "--batch_size=8" in capsys.readouterr().out


def test_a_range_declared_with_the_key_is_checked_and_shown_in_help(tmp_path):
    assert load_config(Demo, ["--dropout=0.5"]).dropout == 0.5
    with pytest.raises(UserError, match=r"command line: dropout=1.0 must be at least 0 and below 1"):
        load_config(Demo, ["--dropout=1.0"])
    with pytest.raises(UserError, match=r"command line: eval_interval=0 must be at least 1"):
        load_config(Demo, ["--eval_interval=0"])
    with pytest.raises(UserError, match=r"dropout=inf must be a finite number"):
        load_config(Demo, ["--dropout=1e999"])
    with pytest.raises(UserError, match=r"command line: name is empty; give it a value"):
        load_config(Demo, ["--name="])
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("dropout = -0.1\n")
    with pytest.raises(UserError, match=r"c.py: dropout=-0.1 must be at least 0"):
        load_config(Demo, [str(cfg_file)])
    assert "a share [at least 0 and below 1]" in config_help(Demo, "demo.py")


STAGES = {"lm": train_lm, "sft": train_sft, "rm": train_rm, "ppo": train_ppo, "dpo": train_dpo,
          "pairs": collect_pairs, "sample": sample, "grpo": train_grpo}


@pytest.mark.parametrize("stage, arg, message", [
    ("lm", "--gradient_accumulation_steps=0", "gradient_accumulation_steps=0 must be at least 1"),
    ("lm", "--batch_size=0", "batch_size=0 must be at least 1"),
    ("lm", "--eval_interval=0", "eval_interval=0 must be at least 1"),
    ("sft", "--batch_size=-4", "batch_size=-4 must be at least 1"),
    ("sft", "--max_new_tokens=-1", "max_new_tokens=-1 must be at least 1"),
    ("rm", "--eval_batch_size=0", "eval_batch_size=0 must be at least 1"),
    ("ppo", "--minibatch_size=0", "minibatch_size=0 must be at least 1"),
    ("ppo", "--temperature=0", "temperature=0.0 must be above 0"),
    ("dpo", "--beta=-0.1", "beta=-0.1 must be above 0"),
    ("dpo", "--eval_interval=0", "eval_interval=0 must be at least 1"),
    ("pairs", "--samples_per_prompt=0", "samples_per_prompt=0 must be at least 1"),
    ("sample", "--temperature=-1", "temperature=-1.0 must be at least 0"),
    ("sample", "--max_new_tokens=-5", "max_new_tokens=-5 must be at least 1"),
])
def test_every_stage_rejects_values_outside_the_declared_range(stage, arg, message):
    with pytest.raises(UserError, match=message):
        load_config(STAGES[stage].Config, [arg])


def test_every_default_and_every_config_file_lies_in_the_declared_ranges():
    for module in STAGES.values():
        load_config(module.Config, [])
    for path in glob.glob(os.path.join(ROOT, "config", "*.py")):
        load_config(STAGES[os.path.basename(path).split("_")[0]].Config, [path])


@pytest.mark.parametrize("text, message", [
    ("batch_size = 32\nlearning_rate = 3e-4 +\n", r"c.py:2: invalid syntax"),
    ("batch_size = 32\nlearning_rate = lr / 10\n", r"c.py:2: NameError: name 'lr' is not defined"),
    ("import no_such_module\n", r"c.py:1: ModuleNotFoundError: No module named 'no_such_module'"),
])
def test_a_config_file_that_does_not_run_is_a_one_line_error_with_its_line(tmp_path, text, message):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(Demo, [str(cfg_file)])


@pytest.mark.parametrize("native, speedup, expected", [(True, 2.6, "bfloat16"), (True, 0.53, "float32"),
                                                       (False, None, "float32")])
def test_auto_dtype_is_bfloat16_only_on_cpus_that_compute_it_natively_and_faster(monkeypatch, capsys, native, speedup,
                                                                                 expected):
    import common
    monkeypatch.setattr(common, "cpu_flags", lambda: ["avx2", "avx512f"] + (["avx512_bf16"] if native else []))
    measured = []
    monkeypatch.setattr(common, "cpu_bf16_speedup", lambda: measured.append(1) or speedup)
    rt = common.setup_runtime(common.RunConfig(device="cpu", dtype="auto"))
    assert rt.dtype == expected
    assert measured == ([1] if native else [])  # without bf16 instructions nothing is measured (emulated: slow)
    said = capsys.readouterr().out
    assert {"bfloat16": "bfloat16 natively", "float32": "run at 0.53x float32's speed" if native else
            "no native bfloat16"}[expected] in said
    assert common.setup_runtime(common.RunConfig(device="cpu", dtype="float32")).dtype == "float32"
    assert common.cpu_has_native_bf16(["amx_bf16", "amx_tile"]) and not common.cpu_has_native_bf16(["avx512f"])


def test_the_bf16_speedup_is_measured_and_one_process_agrees_with_itself():
    import common
    assert common.cpu_bf16_speedup(n=64, reps=1) > 0
    assert common.slowest_over_processes(1.7) == 1.7


def test_the_bf16_speedup_keeps_each_dtypes_fastest_product_over_alternating_rounds(monkeypatch):
    """A burst of other work slows the products it overlaps: the dtypes alternate, each keeps its fastest, so one
    slow round of bf16 does not make a bf16 CPU look slow."""
    import common
    calls, speeds = [], {"bfloat16": iter([1.0, 4.0, 3.0]), "float32": iter([2.0, 1.5, 2.0])}
    monkeypatch.setattr(common, "measure_matmul_flops", lambda device, n, reps, dtype: calls.append(dtype)
                        or next(speeds[dtype]))
    assert common.cpu_bf16_speedup(rounds=3) == 2.0  # 4.0 / 2.0
    assert calls == ["bfloat16", "float32"] * 3
    monkeypatch.undo()  # the real measure_matmul_flops, on a clock that times three products at 1 s, 0.1 s, 1 s
    clock = iter([0.0, 1.0, 1.0, 1.1, 1.1, 2.1])
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert common.measure_matmul_flops("cpu", n=8, reps=3) == pytest.approx(2 * 8 ** 3 / 0.1)
