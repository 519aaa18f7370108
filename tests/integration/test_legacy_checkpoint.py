"""A fine-tune saved by TerraTorch 1.2.10 with `decoder_scale_modules` (the mission's config shape)
served through a real engine on whichever TerraTorch is installed: on 1.2.13, which removed the
argument, the config is translated and the checkpoint keys remapped, and the outputs must still
be the ones TerraTorch 1.2.10 computed (stored beside the committed fixture)."""

from __future__ import annotations

import pytest
import torch
from helpers import encode, engine
from legacy_fixture import copy_model, expected_outputs, requests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    with engine(copy_model(tmp_path_factory.mktemp("legacy")), max_num_seqs=2) as running:
        yield running


def test_old_layout_checkpoint_serves_terratorch_1_2_10_outputs(llm):
    outputs = encode(llm, requests())
    assert (torch.stack(outputs) - expected_outputs()).abs().max() <= 1e-4
