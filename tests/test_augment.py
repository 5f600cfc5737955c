"""data.device_augment: the CPU pipeline's boxes and flips, resized in one roi_align per batch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, cli_here, make_tree, run_dirs
from torchvision import transforms as v1
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from imgcls.data import DataError, DataRecord, ImageFolderData, Normalize, make_dataset, make_loader
from imgcls.data.augment import Crops, DeviceCrop, draw_box, pack_shelves, resolve
from imgcls.data.sampling import EpochSeeded, set_epoch
from imgcls.errors import ConfigError
from imgcls.training.engine import to_device

CPU = torch.device("cpu")
IMAGENET = v2.Compose([v2.RandomResizedCrop(32, antialias=True), v2.RandomHorizontalFlip(0.5)])
# the imagenet preset at 32 px, so a CPU run takes seconds
SMALL_IMAGENET = ["transforms=imagenet", "transforms.train.0.size=32", "transforms.val.0.size=36",
                  "transforms.val.1.size=32"]  # fmt: skip


def smooth_image(h: int = 96, w: int = 128) -> torch.Tensor:
    """Low-frequency sinusoids and a ramp: little energy above what a 2-4x downscale keeps."""
    y, x = torch.linspace(0, 1, h)[:, None], torch.linspace(0, 1, w)[None, :]
    channels = [127.5 + 120 * torch.sin(2 * math.pi * (0.9 * x + 0.6 * y)),
                127.5 + 120 * torch.cos(2 * math.pi * (0.5 * x - 1.1 * y)), 255 * x * y]  # fmt: skip
    return torch.stack(channels).round().clamp(0, 255).to(torch.uint8)


def device_crop(crop: DeviceCrop, image: torch.Tensor, box, flip=False, device=CPU) -> torch.Tensor:
    top, left, h, w = box
    crops, _ = crop.collate([((image[:, top : top + h, left : left + w], flip), 0)])
    return crops.apply(device)[0]


def test_boxes_and_flips_are_the_cpu_pipelines_draws():
    """Same seed, same box and flip as v2.RandomResizedCrop + RandomHorizontalFlip: a run with
    device_augment sees the crops the CPU path would have cut, only resampled differently."""
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    crop = DeviceCrop.of(IMAGENET)
    assert (crop.size, crop.scale, crop.flip_p, crop.antialias) == ((32, 32), (0.08, 1.0), 0.5, True)
    flips = 0
    for seed in range(100):
        torch.manual_seed(seed)
        expected = IMAGENET(image)
        torch.manual_seed(seed)
        region, flip = crop(image)
        torch.manual_seed(seed)
        top, left, h, w = draw_box(60, 80, crop.scale, crop.ratio)
        assert torch.equal(region, image[:, top : top + h, left : left + w])
        cut = F.resized_crop(image, top, left, h, w, [32, 32], antialias=True)
        assert torch.equal(cut.flip(-1) if flip else cut, expected), seed
        flips += flip
    assert 30 < flips < 70


@pytest.mark.parametrize("shape", [(256, 341), (256, 546), (60, 200)])  # 60x200: center-crop fallbacks
def test_box_distribution_matches_random_resized_crop(shape):
    """Area fraction and aspect ratio of 3000 boxes against torchvision's own get_params (other
    seeds, so independent samples): two-sample KS tests and quantiles."""
    from scipy.stats import ks_2samp

    height, width = shape
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    ours, theirs = [], []
    torch.manual_seed(0)
    for _ in range(3000):
        ours.append(draw_box(height, width, (0.08, 1.0), (3 / 4, 4 / 3)))
    torch.manual_seed(1)
    for _ in range(3000):
        theirs.append(v1.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]))
    a, b = np.array(ours, float), np.array(theirs, float)
    for stat in (lambda t: t[:, 2] * t[:, 3] / (height * width), lambda t: np.log(t[:, 3] / t[:, 2])):
        x, y = stat(a), stat(b)
        assert ks_2samp(x, y).pvalue > 0.001
        assert np.abs(np.quantile(x, [0.1, 0.5, 0.9]) - np.quantile(y, [0.1, 0.5, 0.9])).max() < 0.05
    assert (a[:, 0] + a[:, 2] <= height).all() and (a[:, 1] + a[:, 3] <= width).all() and (a >= 0).all()


def _data(tmp_path: Path, workers: int = 0, **kw) -> tuple[ImageFolderData, DataRecord]:
    tree = make_tree(tmp_path / "tree", counts={"train": 4, "val": 1}, size=(40, 30))
    data = ImageFolderData(str(tree), {"train": "train", "val": "val"}, batch_size=4, num_workers=workers,
                           cache="memory", cache_dir=str(tmp_path / "c"), **kw)  # fmt: skip
    return data, data.scan()


def test_boxes_are_a_function_of_seed_epoch_and_index(tmp_path):
    data, record = _data(tmp_path)
    crop = DeviceCrop.of(IMAGENET)
    dataset = EpochSeeded(make_dataset(data, record, "train", crop), seed=5)
    (r1, f1), t1 = dataset[(1, 3)]
    (r1b, f1b), t1b = dataset[(1, 3)]
    assert torch.equal(r1, r1b) and f1 == f1b and t1 == t1b
    other = [dataset[(epoch, 3)][0][0] for epoch in (2, 3, 4)]
    assert any(r.shape != r1.shape or not torch.equal(r, r1) for r in other), "another epoch, other crops"


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_resumed_mid_way_gets_the_same_batches(tmp_path, workers):
    """What a mid-epoch resume sees: the epoch's batches from batch k on, on any number of workers,
    equal those of the uninterrupted epoch, through the device step too."""
    data, record = _data(tmp_path, workers=workers)
    crop = DeviceCrop.of(IMAGENET)
    loader = make_loader(data, record, "train", crop, train=True, seed=7, collate_fn=crop.collate)

    def images(epoch: int, start: int = 0) -> list[torch.Tensor]:
        set_epoch(loader, epoch, start)
        return [to_device(batch, CPU, torch.nn.Identity(), False)[0] for batch in loader]

    whole = images(2)
    assert len(whole) == 3 and whole[0].shape == (4, 3, 32, 32) and whole[0].dtype == torch.float32
    resumed = images(2, start=1)
    assert all(torch.equal(a, b) for a, b in zip(whole[1:], resumed, strict=True))
    assert not torch.equal(images(3)[0], whole[0])
    if workers == 0:  # the workers' copies and the training process's agree
        assert all(torch.equal(a, b) for a, b in zip(whole, images(2), strict=True))


def test_device_crop_is_torchvisions_resized_crop_within_tolerance():
    """roi_align averages ceil(f) x ceil(f) bilinear samples per output pixel (f: the box side over
    the output side); torchvision's antialias=True filters with a triangle of half-width f. On a
    smooth image they differ by the curvature under the two filters, which grows with f, plus the
    reference's rounding to uint8 (0.5) and its fixed-point uint8 weights: observed max 0.9 at
    f=0.6 (upscaling: both are plain bilinear), 1.3 at f=1.6, 3.8 at f=4; a mean under 0.4. The
    bound 1 + f for the max and 0.5 for the mean catches a shifted, transposed or misscaled crop
    (those differ by tens of levels here). With cache_size=256 and 224 px crops, f <= 1.5."""
    image = smooth_image()
    crop = DeviceCrop((32, 32))
    plain = DeviceCrop((32, 32), antialias=False)
    for box in [(0, 0, 96, 128), (10, 20, 40, 50), (5, 5, 20, 20), (0, 0, 96, 96), (30, 40, 64, 70),
                (0, 64, 48, 64), (95, 127, 1, 1)]:  # fmt: skip
        f = max(box[2], box[3]) / 32
        ref = F.resized_crop(image, *box, [32, 32], antialias=True).float()
        diff = (device_crop(crop, image, box) - ref).abs()
        assert diff.max() <= 1 + f and diff.mean() <= 0.5, (box, diff.max(), diff.mean())
        # without antialias, one bilinear sample per pixel at torchvision's coordinates: rounding only
        ref = F.resized_crop(image, *box, [32, 32], antialias=False).float()
        assert (device_crop(plain, image, box) - ref).abs().max() <= 1.0, box


def test_padding_never_reaches_the_output_and_flips_hit_the_flagged_samples():
    image, other = smooth_image(), smooth_image(80, 60).flip(1)
    crop = DeviceCrop((24, 24))
    regions = [image[:, 10:40, 20:50], other, image[:, 0:96, 0:70], image[:, 50:60, 100:128]]
    flips = [True, False, False, True]
    crops, targets = crop.collate([((r, f), i) for i, (r, f) in enumerate(zip(regions, flips, strict=True))])
    assert crops.pixels.shape[:2] == (1, 3) and crops.pixels.dtype == torch.uint8
    assert targets.tolist() == [0, 1, 2, 3] and crops.flips.tolist() == flips
    batch = crops.apply(CPU)
    for i, (region, flip) in enumerate(zip(regions, flips, strict=True)):
        alone = F.resized_crop(region, 0, 0, *region.shape[1:], [24, 24], antialias=True).float()
        x1, y1, x2, y2 = crops.rois[i, 1:].int().tolist()
        assert torch.equal(crops.pixels[0, :, y1:y2, x1:x2], region)
        # the replicated border instead of roi_align's clamp at a region's edge: 1 ulp at most
        # against the region resized on its own canvas
        own = crop.collate([((region, False), 0)])[0].apply(CPU)[0]
        assert (batch[i] - (own.flip(-1) if flip else own)).abs().max() < 1e-4, i
        assert ((own - alone).abs().mean()) < 0.5, i
    for fill in (0, 255):  # outside the regions and their 1-pixel borders, the canvas is never read
        pixels = torch.full_like(crops.pixels, fill)
        for x1, y1, x2, y2 in crops.rois[:, 1:].int().tolist():
            pixels[0, :, y1 - 1 : y2 + 1, x1 - 1 : x2 + 1] = crops.pixels[
                0, :, y1 - 1 : y2 + 1, x1 - 1 : x2 + 1
            ]
        assert torch.equal(crops._replace(pixels=pixels).apply(CPU), batch), fill


def test_shelves_pack_boxes_without_overlap_and_with_little_waste():
    torch.manual_seed(0)
    crop = DeviceCrop((224, 224))
    image = torch.zeros(3, 256, 341, dtype=torch.uint8)
    sizes = [(r.shape[1] + 2, r.shape[2] + 2) for r, _ in (crop(image) for _ in range(256))]
    places, (height, width) = pack_shelves(sizes)
    taken = torch.zeros(height, width, dtype=torch.int32)
    for (top, left), (h, w) in zip(places, sizes, strict=True):
        taken[top : top + h, left : left + w] += 1
    assert taken.max() == 1 and taken.sum() == sum(h * w for h, w in sizes)
    assert taken.sum() / taken.numel() > 0.75  # padding to the largest region: about 0.45 here


def test_settings_resolve_per_device_cache_and_pipeline():
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    digits = v2.Compose([v2.RandomAffine(degrees=10)])
    assert resolve("auto", IMAGENET, cached=True, device=cuda) is not None
    assert resolve("auto", IMAGENET, cached=True, device=CPU) is None
    assert resolve("auto", IMAGENET, cached=False, device=cuda) is None
    assert resolve("auto", digits, cached=True, device=cuda) is None
    assert resolve(False, IMAGENET, cached=True, device=cuda) is None
    assert resolve(True, IMAGENET, cached=False, device=CPU) is not None
    # a resumed run keeps what it started with; a checkpoint older than the key cropped in the workers
    assert resolve("auto", IMAGENET, cached=True, device=cuda, resumed=False) is None
    assert resolve("auto", IMAGENET, cached=False, device=CPU, resumed=True) is not None
    assert resolve(False, IMAGENET, cached=True, device=CPU, resumed=True) is None
    assert DeviceCrop.of(v2.Compose([v2.RandomResizedCrop(32)])).flip_p is None
    assert (
        DeviceCrop.of(v2.Compose([v2.RandomResizedCrop(32, interpolation=v2.InterpolationMode.NEAREST)]))
        is None
    )
    assert DeviceCrop.of(v2.Compose([*IMAGENET.transforms, v2.RandomErasing()])) is None
    with pytest.raises(ConfigError, match=r"data.device_augment=true needs transforms.train .*RandomAffine"):
        resolve("true", digits, cached=True, device=CPU)
    with pytest.raises(DataError, match=r"data.device_augment='yes' is not one of auto, true, false"):
        ImageFolderData(".", {}, batch_size=4, device_augment="yes")


@pytest.mark.slow
def test_a_run_with_device_augment_trains_and_resumes_bit_exactly(tmp_path):
    """data.cache=memory data.device_augment=true on CPU, the imagenet preset at 32 px: a 2-epoch run
    equals a 1-epoch run resumed for a second epoch (the resume takes the setting it started with)."""
    tree = make_tree(tmp_path / "tree", counts={"train": 8, "val": 4, "test": 2}, size=(40, 30))
    args = [*(a for a in TINY if not a.startswith("transforms=")), *SMALL_IMAGENET, f"data.root={tree}", "data.cache=memory", "data.device_augment=true",
            "deterministic=true", "data.num_workers=2"]  # fmt: skip
    runs = {}
    for epochs in (2, 1):
        cwd = tmp_path / f"e{epochs}"
        cwd.mkdir()
        result = cli_here("imgcls.train", *args, f"trainer.epochs={epochs}", cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        (runs[epochs],) = run_dirs(cwd)
    assert "device augment True" in (runs[2] / "summary.txt").read_text()
    last = runs[1] / "weights" / "last.pt"
    assert torch.load(last, weights_only=True)["device_augment"] is True
    result = cli_here("imgcls.train", f"resume={last}", "trainer.epochs=2", cwd=tmp_path / "e1")
    assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(runs[2] / "weights" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_augmented_batch_becomes_the_models_input():
    """engine.to_device: Crops are resized, flipped, normalized and made channels_last."""
    crop = DeviceCrop((8, 8))
    image = smooth_image(20, 24)
    crops, targets = crop.collate([((image, False), 2), ((image[:, :10, :10], True), 1)])
    assert isinstance(crops, Crops)
    mean = torch.nn.Identity()
    images, out_targets = to_device((crops, targets), CPU, mean, True)
    assert images.shape == (2, 3, 8, 8) and images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_targets, targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_output_equals_the_cpu_output_of_the_same_batch():
    """The same collated batch through roi_align on CUDA and on the CPU: float rounding apart, equal.
    Pinned, as the loader hands it over, and under deterministic algorithms (the op is called
    directly, not torchvision's compiled fallback)."""
    image = smooth_image(256, 341)
    crop = DeviceCrop((224, 224))
    torch.manual_seed(0)
    samples = [(crop(image if i % 2 else image.transpose(1, 2)), i) for i in range(16)]
    crops, _ = crop.collate(samples)
    pinned = Crops(*(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in crops))
    cpu = crops.apply(CPU)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        gpu = pinned.apply(torch.device("cuda"))
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == (16, 3, 224, 224)
    assert (gpu.cpu() - cpu).abs().max() < 1e-3
    # the whole hand-over, as train_one_epoch does it: normalized, channels_last, on the GPU
    stats = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    images, _ = to_device((pinned, torch.zeros(16, dtype=torch.int64)), torch.device("cuda"),
                           Normalize(*stats).cuda(), True)  # fmt: skip
    assert images.device.type == "cuda" and images.is_contiguous(memory_format=torch.channels_last)
    assert (images.cpu() - Normalize(*stats)(cpu)).abs().max() < 1e-4
