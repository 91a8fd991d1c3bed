"""BatchNorm re-estimation: cumulative statistics, dropout off, modes and momentum restored."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery import reestimate_batchnorm_
from lit_compress.surgery.bn_stats import batchnorm_buffers, has_batchnorm


def tiny_net(p_drop: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Dropout(p_drop),
        nn.BatchNorm2d(8, momentum=0.3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def synthetic_batches(n_batches: int = 8, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_batches * batch, 3, 6, 6, generator=gen) * 3.0 + 1.5  # shifted, scaled data
    y = torch.randint(0, 4, (n_batches * batch,), generator=gen)
    return list(zip(x.split(batch), y.split(batch)))


def corrupt(model: nn.Module) -> None:
    for _, mean, var, _ in batchnorm_buffers(model):
        mean.fill_(5.0)
        var.fill_(100.0)


def test_has_batchnorm_and_buffers_are_live() -> None:
    model = tiny_net()
    assert has_batchnorm(model) and not has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    assert not has_batchnorm(nn.InstanceNorm2d(3))
    buffers = batchnorm_buffers(model)
    assert [b[0] for b in buffers] == ["2", "5"]
    assert buffers[0][1] is model[2].running_mean and buffers[0][3] is model[2].num_batches_tracked
    assert batchnorm_buffers(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))) == []


def test_cumulative_average_is_exact_and_dropout_is_off() -> None:
    model = tiny_net(p_drop=0.9)  # dropout before the first BN: if it ran, the variance would explode
    corrupt(model)
    batches = synthetic_batches()
    used = reestimate_batchnorm_(model, batches)
    assert used == len(batches)
    with torch.no_grad():
        feats = [model[0](x) for x, _ in batches]  # conv output per batch, (64, 8, 6, 6)
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[2].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[2].running_var, var, rtol=1e-5, atol=1e-5)
    assert int(model[2].num_batches_tracked) == len(batches)


def test_reestimation_restores_outputs_of_true_statistics() -> None:
    batches = synthetic_batches()
    x_all = torch.cat([x for x, _ in batches])
    reference = tiny_net()
    with torch.no_grad():  # "true" stats: one pass over all data as a single batch
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        reference.train()(x_all)
    reference.eval()
    model = tiny_net()
    corrupt(model)
    model.eval()
    with torch.no_grad():
        expected = reference(x_all)
        err_corrupted = (model(x_all) - expected).abs().max().item()
        reestimate_batchnorm_(model, batches)
        got = model(x_all)
    err = (got - expected).abs().max().item()
    assert err_corrupted > 0.1 and err < err_corrupted / 100
    # 8 batches of 64 vs one batch of 512: the second BN sees slightly different inputs in training,
    # and averaged per-batch variances differ slightly from the pooled one (outputs are ~0.7 in size)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() > 0.95


def test_modes_and_momentum_restored_and_num_batches_limit() -> None:
    model = tiny_net(p_drop=0.5).train()
    model[1].eval()
    model[5].eval()
    modes = [m.training for m in model.modules()]
    seen: list[tuple[bool, bool, bool]] = []

    def forward(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.append((net.training, net[1].training, net[2].training))
        return net(batch[0])

    used = reestimate_batchnorm_(model, iter(synthetic_batches(n_batches=10, batch=4)), forward, num_batches=3)
    assert used == 3 and len(seen) == 3
    assert seen[0] == (False, False, True)  # only the BNs train
    assert [m.training for m in model.modules()] == modes
    assert model[2].momentum == 0.3 and model[5].momentum == 0.1


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
def test_default_forward_batch_kinds(kind: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x)

    model = Net()
    data = torch.arange(12.0).view(4, 3)
    batch = {"tensor": data, "tuple": (data, torch.zeros(4)), "dict": {"x": data}}[kind]
    assert reestimate_batchnorm_(model, [batch]) == 1
    torch.testing.assert_close(model.bn.running_mean, data.mean(0))


def test_empty_batches_and_errors_keep_old_statistics() -> None:
    model = tiny_net()
    corrupt(model)
    with pytest.warns(UserWarning, match=r"`batches` yielded no batch"):
        assert reestimate_batchnorm_(model, []) == 0
    assert torch.all(model[2].running_mean == 5.0) and model[2].momentum == 0.3

    def broken(net: nn.Module, batch: object) -> None:
        raise RuntimeError("boom")

    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        reestimate_batchnorm_(model, synthetic_batches(1), broken)
    assert torch.all(model[5].running_var == 100.0) and model[5].momentum == 0.1
    assert all(m.training for m in model.modules())


def test_without_batchnorm_and_bad_num_batches() -> None:
    plain = nn.Sequential(nn.Linear(2, 2))
    assert reestimate_batchnorm_(plain, [torch.randn(1, 2)]) == 0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=r"`num_batches`=.* is not allowed: expected an int >= 1"):
            reestimate_batchnorm_(copy.deepcopy(tiny_net()), [], num_batches=bad)  # type: ignore[arg-type]
