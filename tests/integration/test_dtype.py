"""`dtype=bfloat16` is honoured for weights, dummy inputs and request tensors; a Terratorch model on CPU
defaults to float32 and to every core for its forward (engine/compat.terratorch_cpu_defaults), and runs
eagerly whether or not --enforce-eager is given (engine/compat.eager_forward)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import distinct_requests, encode, module_engine, reference_outputs

from vllm_terratorch.testing.samples import sample_pretrained_cfg

pytestmark = pytest.mark.integration
CFG = sample_pretrained_cfg("segmentation")


llm = module_engine(CFG, dtype="bfloat16")


def test_bfloat16_engine_matches_bfloat16_forward(llm):
    requests = distinct_requests(CFG["input"], 8, seed=31)
    outputs = encode(llm, requests)
    assert {o.dtype for o in outputs} == {torch.bfloat16}
    # PyTorch's own bf16 kernels: oneDNN's get Prithvi's patch embedding wrong on AMX CPUs (the
    # engine finds and avoids that kernel, see core/kernels.py; a plain oneDNN forward does not).
    with torch.backends.mkldnn.flags(enabled=False):
        references = reference_outputs(CFG, requests, dtype=torch.bfloat16)
    exact = reference_outputs(CFG, requests)
    for out, ref, full in zip(outputs, references, exact):
        # Same arithmetic as a plain bf16 forward (batching may reorder float sums slightly)...
        assert (out.float() - ref.float()).abs().max() <= 0.1 * full.abs().max()
        # ...and far closer to the float32 result than an unrelated output would be.
        assert (out.float() - full).abs().mean() <= 0.05 * full.abs().mean() + 1e-3


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "expected"),
    [
        ("auto", None, torch.float32),  # the mission's `vllm serve` line: no --dtype, no torch_dtype
        ("auto", "float32", torch.float32),
        ("auto", "bfloat16", torch.bfloat16),  # a config that asks for bf16 keeps it
        ("float16", None, torch.float16),  # an explicit --dtype always wins
        ("bfloat16", "float32", torch.bfloat16),
    ],
)
def test_cpu_default_dtype_is_float32(tmp_path, dtype, torch_dtype, expected):
    """vLLM alone resolves "auto" to float16 here; a Terratorch model on CPU gets float32 instead."""
    import json

    from vllm.engine.arg_utils import EngineArgs

    from vllm_terratorch.testing.samples import write_model_folder

    folder = write_model_folder(tmp_path / "model", CFG)
    if torch_dtype is not None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": torch_dtype}))
    args = EngineArgs(model=str(folder), model_impl="terratorch", skip_tokenizer_init=True, dtype=dtype)
    assert args.create_model_config().dtype == expected


def test_other_architectures_keep_vllms_choice(tmp_path):
    """The shim touches only `Terratorch`: vLLM's own resolver still downcasts other float32 models."""
    from transformers import PretrainedConfig
    from vllm.config import model as model_config

    import vllm_terratorch

    vllm_terratorch.register()
    other = PretrainedConfig(architectures=["BertModel"], model_type="bert")
    assert model_config._get_and_verify_dtype("x", other, "auto", is_pooling_model=True) != torch.float32
    ours = PretrainedConfig(architectures=["Terratorch"], model_type="")
    assert model_config._get_and_verify_dtype("x", ours, "auto", is_pooling_model=True) == torch.float32


@pytest.mark.parametrize(("preset", "expected"), [(None, 0), ("1", 1), ("0", 0)])
def test_the_forward_gets_every_cpu_core_unless_the_user_says_otherwise(tmp_path, monkeypatch, preset, expected):
    """vLLM's CPU executor reserves a core for its scheduler unless VLLM_CPU_NUM_OF_RESERVED_CPU says
    otherwise: for a Terratorch model it is 0 by default, and a value the user set wins."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    from vllm_terratorch.envs import RESERVED_CPUS
    from vllm_terratorch.testing.samples import write_model_folder

    monkeypatch.setenv(RESERVED_CPUS, "restored after the test")
    monkeypatch.delenv(RESERVED_CPUS)
    if preset is not None:
        monkeypatch.setenv(RESERVED_CPUS, preset)
    folder = write_model_folder(tmp_path / "model", CFG)
    config = EngineArgs(model=str(folder), model_impl="terratorch", skip_tokenizer_init=True).create_engine_config()
    manager = OMPProcessManager(config)
    assert manager.reserve_cpu_num == expected
    assert sum(len(cpus) for cpus in manager.cpu_lists) + len(manager.reserved_cpu_list) >= 1
    if expected == 0:
        assert manager.reserved_cpu_list == []


def test_other_architectures_keep_vllms_reserved_core(monkeypatch):
    from transformers import PretrainedConfig
    from vllm.config import model as model_config

    import vllm_terratorch
    from vllm_terratorch.envs import RESERVED_CPUS

    monkeypatch.setenv(RESERVED_CPUS, "restored after the test")
    monkeypatch.delenv(RESERVED_CPUS)
    vllm_terratorch.register()
    model_config._get_and_verify_dtype("x", PretrainedConfig(architectures=["BertModel"], model_type="bert"), "auto",
                                       is_pooling_model=True)
    assert RESERVED_CPUS not in os.environ


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_the_forward_runs_eagerly_without_enforce_eager(tmp_path, enforce_eager):
    """Left out, --enforce-eager is set for a Terratorch model (engine/compat.eager_forward): vLLM's
    CUDA graphs would replay their capture's dummy inputs, and its compilation finds nothing of ours."""
    from vllm.config import CompilationMode, CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    from vllm_terratorch.testing.samples import write_model_folder

    folder = write_model_folder(tmp_path / "model", CFG)
    config = EngineArgs(
        model=str(folder), model_impl="terratorch", skip_tokenizer_init=True, enforce_eager=enforce_eager
    ).create_engine_config()
    assert config.model_config.enforce_eager
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert config.compilation_config.mode == CompilationMode.NONE


def test_other_architectures_keep_vllms_graphs():
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    import vllm_terratorch
    from vllm_terratorch.core.config import ARCHITECTURE
    from vllm_terratorch.engine.compat import GUARD_MARK

    vllm_terratorch.register()
    assert getattr(MODELS_CONFIG_MAP[ARCHITECTURE], GUARD_MARK, False)
    assert not [name for name, entry in MODELS_CONFIG_MAP.items() if name != ARCHITECTURE and getattr(entry, GUARD_MARK, False)]


@pytest.mark.parametrize(
    ("given", "bind", "expected"),
    [
        ({}, None, "uni"),  # the mission's line: the worker runs inside the engine-core process
        ({"distributed_executor_backend": "uni"}, None, "uni"),
        ({"distributed_executor_backend": "mp"}, None, "mp"),  # asked for: vLLM's worker process
        ({}, "auto", "mp"),  # a binding the user asked for needs vLLM's worker process
        ({}, "0-1", "mp"),
    ],
)
def test_the_cpu_worker_runs_in_the_engine_core_process(tmp_path, monkeypatch, given, bind, expected):
    """vLLM's CPU platform turns `uni` into `mp` when the engine core has its own process; for a
    Terratorch model it stays `uni` (engine/compat.worker_in_engine_process) unless the user chose."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_terratorch.envs import CPU_THREADS_BIND
    from vllm_terratorch.testing.samples import write_model_folder

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # vLLM's default: an engine-core process
    monkeypatch.delenv(CPU_THREADS_BIND, raising=False)
    if bind is not None:
        monkeypatch.setenv(CPU_THREADS_BIND, bind)
    folder = write_model_folder(tmp_path / "model", CFG)
    config = EngineArgs(model=str(folder), model_impl="terratorch", skip_tokenizer_init=True, **given).create_engine_config()
    assert config.parallel_config.distributed_executor_backend == expected


def test_other_architectures_keep_vllms_worker_process(tmp_path, monkeypatch):
    """The same platform check on the same config, but for another architecture: vLLM's `mp` stays."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from vllm_terratorch.envs import CPU_THREADS_BIND
    from vllm_terratorch.testing.samples import write_model_folder

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv(CPU_THREADS_BIND, raising=False)
    folder = write_model_folder(tmp_path / "model", CFG)
    config = EngineArgs(model=str(folder), model_impl="terratorch", skip_tokenizer_init=True).create_engine_config()
    config.parallel_config.distributed_executor_backend = "uni"
    config.model_config.hf_config.architectures = ["BertModel"]
    current_platform.check_and_update_config(config)
    assert config.parallel_config.distributed_executor_backend == "mp"
