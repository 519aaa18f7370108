"""The opt-in compiled forward: buckets, padding, exact per-request outputs, and the switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vllm_terratorch import envs
from vllm_terratorch.core.compiled import CompiledForward, batch_buckets, bucket_for, pad_batch
from vllm_terratorch.errors import ConfigError


@pytest.mark.parametrize(
    ("max_batch", "buckets"),
    [(1, (1,)), (2, (1, 2)), (6, (1, 2, 4, 6)), (8, (1, 2, 4, 8)), (9, (1, 2, 4, 8, 9))],
)
def test_batch_buckets(max_batch, buckets):
    assert batch_buckets(max_batch) == buckets


def test_batch_buckets_refuse_zero():
    with pytest.raises(ValueError, match="at least 1"):
        batch_buckets(0)


def test_bucket_for():
    buckets = (1, 2, 4, 6)
    assert [bucket_for(n, buckets) for n in range(1, 8)] == [1, 2, 4, 4, 6, 6, None]


def test_pad_batch_repeats_last_row_of_batch_tensors_only():
    images = torch.arange(3 * 2, dtype=torch.float32).reshape(3, 2)
    coords = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    other = torch.ones(5)  # not batch-leading: left alone
    args, kwargs = pad_batch(((images,), {"location_coords": coords, "other": other, "flag": True}), 3, 4)
    assert torch.equal(args[0], torch.cat([images, images[-1:]]))
    assert torch.equal(kwargs["location_coords"][3], coords[2])
    assert kwargs["other"] is other and kwargs["flag"] is True
    assert pad_batch((images,), 3, 3)[0] is images


class SmallNet(nn.Module):
    """Convolution, normalisation and a keyword input: what compiled graphs meet in Prithvi + UperNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor, location_coords: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.norm(self.conv(x)))
        return {"output": features + self.head(location_coords)[:, :, None, None]}


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    network = SmallNet().eval()
    for parameter in network.parameters():
        parameter.data.normal_()
    network.norm.running_mean.normal_()
    forward = CompiledForward(network, "default", max_batch=4)
    generator = torch.Generator().manual_seed(1)

    def make_batch(size):
        return (torch.randn(size, 3, 8, 8, generator=generator),), {"location_coords": torch.randn(size, 2, generator=generator)}

    forward.warm_up(make_batch)
    return network, forward


def test_every_request_gets_its_own_eager_output(compiled):
    network, forward = compiled
    generator = torch.Generator().manual_seed(2)
    before = forward.batches_run
    for count in (1, 2, 3, 4):  # 3 runs padded to the bucket of 4
        x = torch.randn(count, 3, 8, 8, generator=generator)
        coords = torch.randn(count, 2, generator=generator)
        args, kwargs = (x,), {"location_coords": coords}
        assert forward.accepts(args, kwargs, count)
        with torch.inference_mode():
            got = forward(args, kwargs, count)
            want = network(x, location_coords=coords)["output"]
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= 1e-5
    assert forward.batches_run == before + 4


class OwnCacheNet(SmallNet):
    """Its own forward code object, so dynamo's compile cache starts empty for this test alone."""

    def forward(self, x: torch.Tensor, location_coords: torch.Tensor) -> dict[str, torch.Tensor]:
        return super().forward(x, location_coords)


def test_no_recompilation_whatever_the_tensors_are_made_in():
    # vLLM builds batches outside inference mode; padded batches and the warm-up's are made inside
    # it. Both must hit the graphs compiled at warm-up (a recompile on a live request takes seconds).
    from torch._dynamo.utils import counters

    forward = CompiledForward(OwnCacheNet().eval(), "default", max_batch=4)
    forward.warm_up(lambda size: ((torch.randn(size, 3, 8, 8),), {"location_coords": torch.randn(size, 2)}))
    graphs = counters["stats"]["unique_graphs"]
    for count in (4, 3, 1):
        x, coords = torch.randn(count, 3, 8, 8), torch.randn(count, 2)
        forward((x,), {"location_coords": coords}, count)
        with torch.inference_mode():
            forward((x.clone(),), {"location_coords": coords.clone()}, count)
    assert counters["stats"]["unique_graphs"] == graphs


def test_other_shapes_and_larger_batches_are_not_accepted(compiled):
    _, forward = compiled
    coords = {"location_coords": torch.zeros(1, 2)}
    assert not forward.accepts((torch.zeros(1, 3, 16, 16),), coords, 1)  # not the warmed-up size
    assert not forward.accepts((torch.zeros(1, 3, 8, 8, dtype=torch.float64),), coords, 1)
    assert not forward.accepts((torch.zeros(5, 3, 8, 8),), {"location_coords": torch.zeros(5, 2)}, 5)
    with pytest.raises(ValueError, match="largest compiled batch"):
        forward((torch.zeros(5, 3, 8, 8),), {"location_coords": torch.zeros(5, 2)}, 5)


def test_not_ready_before_warm_up():
    forward = CompiledForward(SmallNet().eval(), "default", max_batch=2)
    assert not forward.ready
    assert not forward.accepts((torch.zeros(1, 3, 8, 8),), {"location_coords": torch.zeros(1, 2)}, 1)


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, None), ("", None), ("0", None), ("off", None), ("1", "default"), ("on", "default"),
     ("reduce-overhead", "reduce-overhead"), ("Max-Autotune-No-Cudagraphs", "max-autotune-no-cudagraphs")],
)
def test_compile_switch(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv("VLLM_TERRATORCH_COMPILE", raising=False)
    else:
        monkeypatch.setenv("VLLM_TERRATORCH_COMPILE", value)
    assert envs.compile_mode() == mode


def test_unknown_compile_setting_is_named(monkeypatch):
    monkeypatch.setenv("VLLM_TERRATORCH_COMPILE", "fast")
    with pytest.raises(ConfigError, match=r"VLLM_TERRATORCH_COMPILE='fast'.*reduce-overhead"):
        envs.compile_mode()
