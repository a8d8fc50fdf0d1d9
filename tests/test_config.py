"""common.load_config: Python config files, --key=value overrides, type checks, clear errors, --help."""
import typing
from dataclasses import dataclass

import pytest

from common import RunConfig, UserError, config_help, load_config


@dataclass
class Demo(RunConfig):
    learning_rate: float = 1e-3  # the step size
    batch_size: int = 8  # sequences per step
    name: str = "run"  # a label
    flag: bool = False  # a switch
    mode: typing.Literal["a", "b"] = "a"  # one of two modes


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


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_only_on_cpus_that_compute_it_natively(monkeypatch, capsys, native):
    import common
    monkeypatch.setattr(common, "cpu_flags", lambda: ["avx2", "avx512f"] + (["avx512_bf16"] if native else []))
    rt = common.setup_runtime(common.RunConfig(device="cpu", dtype="auto"))
    assert rt.dtype == ("bfloat16" if native else "float32")
    assert ("bfloat16 natively" if native else "no native bfloat16") in capsys.readouterr().out
    assert common.setup_runtime(common.RunConfig(device="cpu", dtype="float32")).dtype == "float32"
    assert common.cpu_has_native_bf16(["amx_bf16", "amx_tile"]) and not common.cpu_has_native_bf16(["avx512f"])
