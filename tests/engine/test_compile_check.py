"""The trainer's guard against Inductor's wrong CPU gradients (engine.compile.check_cpu_compile)."""
import pytest
import torch

from fastmice.core.errors import ConfigError
from fastmice.engine import compile as compile_module


def test_a_cpu_whose_inductor_miscomputes_gradients_refuses_compile(monkeypatch):
    monkeypatch.setattr(compile_module, "inductor_cpu_gradients_ok", lambda: False)
    with pytest.raises(ConfigError, match="train.compile=default on this CPU.*train.compile=off"):
        compile_module.check_cpu_compile("default", torch.device("cpu"))
    compile_module.check_cpu_compile("off", torch.device("cpu"))              # eager: nothing to check
    compile_module.check_cpu_compile("default", torch.device("cuda"))         # the check is for the CPU only


def test_a_cpu_whose_inductor_is_right_compiles(monkeypatch):
    monkeypatch.setattr(compile_module, "inductor_cpu_gradients_ok", lambda: True)
    compile_module.check_cpu_compile("reduce-overhead", torch.device("cpu"))
