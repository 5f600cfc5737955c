"""BatchNorm recalibration (imgcls.training.batchnorm), in process: stale statistics, what it restores, config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgcls.data.loaders import Normalize
from imgcls.training.batchnorm import Recalibration, batchnorm_layers, build_recalibration, recalibrate
from imgcls.training.engine import Placement, evaluate

CPU = torch.device("cpu")
NORMALIZE = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
PLACE = Placement(CPU, NORMALIZE)  # fp32, NCHW, one process


def colored_batches(
    n_batches: int, batch: int = 16, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 8x8 images whose brightest channel is the class (3 classes), with noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        targets = torch.randint(0, 3, (batch,), generator=g)
        images = torch.randint(40, 120, (batch, 3, 8, 8), generator=g)
        images[torch.arange(batch), targets] += 120
        out.append((images.to(torch.uint8), targets))
    return out


def tiny_net(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def trained_net(steps: int = 30, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_net(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for images, targets in colored_batches(steps, seed=1):
        loss = nn.functional.cross_entropy(model(NORMALIZE(images)), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def val_acc(model: nn.Module, batches) -> float:
    metrics, _, _ = evaluate(
        model, batches, nn.functional.cross_entropy, Placement(CPU, NORMALIZE, log_every=10**6)
    )
    return metrics["val/acc"]


def test_stale_statistics_report_the_true_accuracy_after_recalibration():
    model, val, train = trained_net(), colored_batches(8, seed=2), colored_batches(6, seed=3)
    recalibrate(model, train, CPU, NORMALIZE)
    true_acc = val_acc(model, val)
    assert true_acc > 0.9, "the tiny net learns the task"
    for bn in batchnorm_layers(model):  # statistics that lag far behind the weights
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(1e-3)
    stale = val_acc(model, val)
    assert stale < 0.6, f"stale statistics understate the model: {stale}"
    assert recalibrate(model, train, CPU, NORMALIZE) == 6
    assert val_acc(model, val) == true_acc


def test_statistics_are_the_average_of_the_batches_statistics():
    model, train = trained_net(), colored_batches(4, seed=3)
    recalibrate(model, train, CPU, NORMALIZE)
    first = model[0]  # the first BatchNorm layer sees the first conv's output, in train mode
    with torch.no_grad():
        outs = [first(NORMALIZE(images)) for images, _ in train]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)


def test_momentum_counters_modes_and_the_global_generator_are_left_as_they_were():
    model = trained_net(dropout=0.5)
    model.eval()
    model[0].train()
    tracked = [bn.num_batches_tracked.clone() for bn in batchnorm_layers(model)]
    rng = torch.get_rng_state()
    recalibrate(model, colored_batches(3, seed=4), CPU, NORMALIZE, seed=7)
    assert torch.equal(torch.get_rng_state(), rng), "the global generator is untouched"
    assert [bn.momentum for bn in batchnorm_layers(model)] == [0.1, None]
    assert [bn.num_batches_tracked for bn in batchnorm_layers(model)] == tracked
    assert [m.training for m in model] == [True] + [False] * (len(model) - 1)
    # dropout draws from the seed: the same seed recomputes the same statistics
    again = trained_net(dropout=0.5)
    again.load_state_dict(model.state_dict())
    recalibrate(again, colored_batches(3, seed=4), CPU, NORMALIZE, seed=7)
    for a, b in zip(model.buffers(), again.buffers(), strict=True):
        assert torch.equal(a, b)


def test_a_model_without_batchnorm_is_unchanged():
    model = nn.Sequential(nn.Flatten(), nn.LayerNorm(192), nn.Linear(192, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate(model, colored_batches(2), CPU, NORMALIZE) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    recal = Recalibration(loader=None, device=CPU, normalize=NORMALIZE, seed=0)
    assert recal([model], epoch=1) == {}, "nothing ran, nothing is logged"


@pytest.fixture
def data(tiny_tree):
    from imgcls.config import build as b

    config = {"_target_": "imgcls.data.ImageFolderData", "root": str(tiny_tree), "splits": {"train": "train", "val": "val"},
              "batch_size": 4, "num_workers": 0}  # fmt: skip
    data = b.build_data(config)
    return data, data.scan()  # the options and the record: what build_recalibration takes


def pipelines():
    from torchvision.transforms import v2

    return {"train": v2.Compose([v2.Resize((8, 8)), v2.RandomHorizontalFlip()]), "val": v2.Resize((8, 8))}


def test_the_recalibration_loader_takes_n_batches_drawn_from_seed_and_epoch(data):
    from imgcls.data.sampling import set_epoch

    shard = {"seed": 3, "pin_memory": False, "rank": 0, "world": 1}
    recal = build_recalibration(
        {"enabled": True, "batches": 2, "transforms": "train"}, *data, pipelines(), shard, PLACE,
    )  # fmt: skip
    assert len(recal.loader) == 2

    def draw(epoch):
        set_epoch(recal.loader, epoch)
        return [(images.clone(), targets.clone()) for images, targets in recal.loader]

    first, again, other = draw(1), draw(1), draw(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    assert build_recalibration({"enabled": False}, *data, pipelines(), shard, PLACE) is None  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batches": 0}, "batches must be at least 1, got 0"),
        ({"transforms": "val"}, "must be eval or train, got 'val'"),
        ({"max_share": 0}, r"max_share must be a number in \(0, 1\] .* got 0"),
        ({"max_share": 1.5}, r"max_share must be a number in \(0, 1\] .* got 1.5"),
        ({"max_share": "half"}, r"max_share .* got 'half'"),
    ],
)
def test_bad_settings_name_the_key(data, settings, message):
    from imgcls.errors import ConfigError

    shard = {"seed": 3, "pin_memory": False, "rank": 0, "world": 1}
    with pytest.raises(ConfigError, match=message):
        build_recalibration({"enabled": True, "batches": 4, **settings}, *data, pipelines(), shard, PLACE)  # fmt: skip


@pytest.mark.parametrize(
    ("share", "epoch_batches", "expected"), [(None, 6, 4), (0.5, 6, 3), (0.25, 6, 2), (0.01, 6, 1), (1, 2, 2)]
)
def test_max_share_caps_the_batches_at_a_share_of_an_epoch(data, share, epoch_batches, expected):
    """On a small train split the recalibration would cost a third of an epoch (a forward pass over
    nearly every training image); max_share caps it at a share of the epoch's batches, rounded up."""
    shard = {"seed": 3, "pin_memory": False, "rank": 0, "world": 1}
    recal = build_recalibration(
        {"enabled": True, "batches": 4, "max_share": share}, *data, pipelines(), shard, PLACE, epoch_batches=epoch_batches,
    )  # fmt: skip
    assert len(recal.loader) == expected
