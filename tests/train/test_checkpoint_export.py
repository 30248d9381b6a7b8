"""HF export under ZeRO 0-2: only rank 0 copies the full weights to host memory (the 2-rank save-and-load path is
tests/train/test_launcher.py)."""

import pytest
import torch

from btrm.train.checkpoint import gathered_state_dict


class _Engine:
    """What gathered_state_dict reads of a DeepSpeed engine under ZeRO 0-2: the stage and the wrapped module."""

    def __init__(self, stage, module):
        self.stage, self.module = stage, module

    def zero_optimization_stage(self):
        return self.stage


class _Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rm = torch.nn.Linear(3, 1, bias=False)
        self.state_dict_calls = 0

    def state_dict(self, *args, **kwargs):
        self.state_dict_calls += 1
        return super().state_dict(*args, **kwargs)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_only_rank0_builds_the_state_dict(stage):
    module = _Wrapper()
    assert gathered_state_dict(_Engine(stage, module), rank=1) is None
    assert module.state_dict_calls == 0  # no full CPU copy on the other ranks
    sd = gathered_state_dict(_Engine(stage, module), rank=0)
    assert list(sd) == ["weight"] and sd["weight"].device.type == "cpu"  # HF keys, wrapper prefix gone
    assert torch.equal(sd["weight"], module.rm.weight.detach())
