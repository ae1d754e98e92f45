"""Tests of the data layer against independent truth: exact crops of synthetic images, sklearn's raw digits,
torch's DistributedSampler partition, invariants of the sampler and bit-exact resumption."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DistributedSampler

from mfrae.data import (
    DataError,
    DigitsDataset,
    ImageFolderDataset,
    LatentDataset,
    ResumableSampler,
    build_dataset,
    build_latent_cache,
    center_crop_arr,
    make_loader,
)
from mfrae.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# helpers


def solid(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def ramp(size: int) -> Image.Image:
    """An RGB image whose red channel is the column index: left-right asymmetric, lossless in PNG."""
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(size, dtype=np.uint8)[None, :]
    arr[:, :, 1] = 200
    return Image.fromarray(arr)


def truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])


def avg_pool_encoder(images: torch.Tensor) -> torch.Tensor:
    """Deterministic stand-in for the frozen encoder: [B, 3, 16, 16] -> [B, 3, 4, 4]."""
    return F.avg_pool2d(images, 4)


# ----------------------------------------------------------------------------------------------------------
# ADM center crop


@pytest.mark.parametrize("size", [(300, 200), (64, 64), (50, 30), (1000, 37), (37, 1000), (129, 640)])
def test_center_crop_output_size(size: tuple[int, int]) -> None:
    out = center_crop_arr(solid((10, 20, 30), size), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out == np.array([10, 20, 30], dtype=np.uint8)).all()  # a uniform image stays uniform


def test_center_crop_takes_the_middle_of_a_wide_image() -> None:
    s = 24  # 3s x s, thirds red | green | blue: no resize needed, the crop is exactly the green third
    arr = np.zeros((s, 3 * s, 3), dtype=np.uint8)
    arr[:, :s] = (255, 0, 0)
    arr[:, s : 2 * s] = (0, 255, 0)
    arr[:, 2 * s :] = (0, 0, 255)
    out = center_crop_arr(Image.fromarray(arr), s)
    assert (out == np.array([0, 255, 0], dtype=np.uint8)).all()


def test_center_crop_box_halving_keeps_an_aligned_edge_exact() -> None:
    s = 16  # 8s x 4s, black | white at column 4s: two BOX halvings -> 2s x s with the edge at column s
    arr = np.zeros((4 * s, 8 * s), dtype=np.uint8)
    arr[:, 4 * s :] = 255
    out = center_crop_arr(Image.fromarray(arr, mode="L"), s)
    assert out.shape == (s, s)
    assert (out[:, : s // 2] == 0).all() and (out[:, s // 2 :] == 255).all()


@pytest.mark.parametrize("extra, left", [(1, 0), (2, 1), (3, 1)])
def test_center_crop_odd_margin_goes_right(extra: int, left: int) -> None:
    s = 20
    arr = np.tile(np.arange(s + extra, dtype=np.uint8)[None, :], (s, 1))  # pixel value = column index
    out = center_crop_arr(Image.fromarray(arr, mode="L"), s)
    assert (out == np.arange(left, left + s, dtype=np.uint8)[None, :]).all()


def test_center_crop_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="image_size"):
        center_crop_arr(solid((0, 0, 0)), 0)


# ----------------------------------------------------------------------------------------------------------
# image folders


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """root/{cat,ant}/... with mixed extensions and case, a nested folder, a hidden folder and a text file."""
    root = tmp_path / "imgs"
    (root / "cat" / "nested").mkdir(parents=True)
    (root / "ant").mkdir()
    (root / ".cache").mkdir()
    solid((255, 0, 0)).save(root / "cat" / "b.png")
    solid((0, 255, 0)).save(root / "cat" / "A.PNG")
    solid((0, 0, 255)).save(root / "cat" / "nested" / "c.bmp")
    ramp(16).save(root / "ant" / "ramp.png")
    solid((9, 9, 9)).save(root / "ant" / "x.JPEG")
    solid((1, 1, 1)).save(root / ".cache" / "ignored.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_folder_labels_and_order(folder: Path) -> None:
    ds = ImageFolderDataset(folder, 16, random_flip=False)
    assert ds.classes == ["ant", "cat"] and ds.num_classes == 2
    rel = [str(Path(ds.path(i)).relative_to(folder)) for i in range(len(ds))]
    assert rel == ["ant/ramp.png", "ant/x.JPEG", "cat/A.PNG", "cat/b.png", "cat/nested/c.bmp"]
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1, 1, 1]
    image, label = ds[3]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert torch.equal(image, torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 16, 16))
    assert ds.bad_files == {}


def test_folder_flip_is_deterministic_per_seed_epoch_index(folder: Path) -> None:
    ds = ImageFolderDataset(folder, 16, random_flip=True)
    plain = ImageFolderDataset(folder, 16, random_flip=False)[0][0]
    seen = set()
    for epoch in range(16):
        (a, _), _ = ds.load(0, epoch, seed=3)
        (b, _), _ = ds.load(0, epoch, seed=3)
        assert torch.equal(a, b)
        if torch.equal(a, plain):
            seen.add("plain")
        else:
            assert torch.equal(a, torch.flip(plain, dims=(-1,)))
            seen.add("flipped")
    assert seen == {"plain", "flipped"}  # 16 fair coins all equal has probability 2^-15


def test_folder_skips_and_counts_bad_files(folder: Path) -> None:
    truncated_jpeg(folder / "ant" / "broken.jpg")
    (folder / "cat" / "garbage.png").write_bytes(b"\x89PNG not really" + bytes(range(256)))
    ds = ImageFolderDataset(folder, 16, random_flip=False)
    names = [Path(ds.path(i)).name for i in range(len(ds))]
    assert names == ["broken.jpg", "ramp.png", "x.JPEG", "A.PNG", "b.png", "garbage.png", "c.bmp"]
    # A bad item is replaced by the next readable one, with that one's label.
    assert torch.equal(ds[0][0], ds[1][0]) and ds[0][1] == 0
    assert torch.equal(ds[5][0], ds[6][0]) and ds[5][1] == 1
    assert set(ds.bad_files) == {ds.path(0), ds.path(5)}
    assert "Truncated" in ds.bad_files[ds.path(0)] or "truncated" in ds.bad_files[ds.path(0)]
    _, bad = ds.load(5, 0, 0)
    assert [p for p, _ in bad] == [ds.path(5)]  # known bad files are still reported by load()


def test_folder_wraps_around_to_find_a_replacement(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    solid((0, 0, 255)).save(tmp_path / "a" / "0.png")
    (tmp_path / "a" / "1.png").write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path, 16, random_flip=False)
    assert torch.equal(ds[1][0], ds[0][0])


def test_folder_raise_mode_names_the_file(folder: Path) -> None:
    truncated_jpeg(folder / "ant" / "broken.jpg")
    ds = ImageFolderDataset(folder, 16, on_error="raise")
    with pytest.raises(DataError, match="broken.jpg"):
        ds[0]
    with pytest.raises(DataError, match="on_error"):
        ImageFolderDataset(folder, 16, on_error="ignore")


def test_folder_image_over_max_pixels_is_bad(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 16x16 = 256 pixels: Pillow would only warn
    ds = ImageFolderDataset(folder, 16, random_flip=False)
    with pytest.raises(DataError, match=r"no readable images in .* \(5 skipped; e\.g\. "):
        ds[0]
    with pytest.raises(DataError, match="DecompressionBomb"):
        ImageFolderDataset(folder, 16, on_error="raise")[0]


def test_folder_all_bad_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"no readable images in .* \(1 skipped; "):
        ImageFolderDataset(tmp_path, 8)[0]


def test_folder_empty_or_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path)):
        ImageFolderDataset(tmp_path, 8)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    solid((0, 0, 0)).save(tmp_path / "b" / "x.png")
    with pytest.raises(DataError, match="contain no image.*: a"):
        ImageFolderDataset(tmp_path, 8)


def test_loader_brings_worker_bad_files_to_the_main_process(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    truncated_jpeg(folder / "ant" / "broken.jpg")
    (folder / "cat" / "garbage.png").write_bytes(b"junk")
    ds = ImageFolderDataset(folder, 16)
    loader = make_loader(ds, batch_size=1, seed=0, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="mfrae.data"):
        it = iter(loader)
        for _ in range(2 * loader.steps_per_epoch):  # each epoch requests every index once
            images, labels = next(it)
            assert images.shape == (1, 3, 16, 16) and labels.dtype == torch.int64
    loader.close()
    bad = {str(folder / "ant" / "broken.jpg"), str(folder / "cat" / "garbage.png")}
    assert set(loader.bad_files) == bad
    assert ds.bad_files == {}  # the main process's copy never decoded anything: the count came from workers
    assert sum("skipped unreadable image" in r.message for r in caplog.records) == 2  # one warning per file
    # Workers do not change the batches: same items, same flips as in-process loading.
    in_process = _batches(make_loader(ds, batch_size=2, seed=0, num_workers=0), 6)
    with_workers = _batches(make_loader(ds, batch_size=2, seed=0, num_workers=2), 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(in_process, with_workers))


# ----------------------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits_all() -> DigitsDataset:
    return DigitsDataset(image_size=32, split="all")


def test_digits_all_matches_sklearn(digits_all: DigitsDataset) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert len(digits_all) == 1797 and digits_all.num_classes == 10
    assert sorted(set(digits_all.labels.tolist())) == list(range(10))
    assert (digits_all.labels == raw.target).all()
    image, label = digits_all[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == raw.target[5]
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    values = digits_all.images
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.9
    native = DigitsDataset(image_size=8, split="all")  # no resampling: exactly sklearn's values / 16
    assert torch.equal(native[5][0][0], torch.from_numpy(raw.images[5]).float() / 16)


def test_digits_split_is_disjoint_covering_and_stratified(digits_all: DigitsDataset) -> None:
    train, test = DigitsDataset(8, "train"), DigitsDataset(8, "test")
    tr, te = set(train.indices.tolist()), set(test.indices.tolist())
    assert not tr & te and tr | te == set(range(1797))
    assert 0.18 < len(te) / 1797 < 0.22
    for cls in range(10):
        share = (test.labels == cls).sum() / (digits_all.labels == cls).sum()
        assert abs(share - 0.2) < 0.02
    assert (DigitsDataset(8, "test").indices == test.indices).all()  # fixed split
    assert (train.labels == digits_all.labels[train.indices]).all()


def test_digits_flip_off_by_default_and_bad_options() -> None:
    ds = DigitsDataset(8, "test")
    assert all(torch.equal(ds.load(0, e, 0)[0][0], ds[0][0]) for e in range(8))
    with pytest.raises(DataError, match="split"):
        DigitsDataset(8, "validation")


# ----------------------------------------------------------------------------------------------------------
# sampler


@pytest.mark.parametrize("n, world", [(10, 3), (12, 4), (7, 1), (5, 8)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_partition_matches_distributed_sampler(n: int, world: int, drop_last: bool) -> None:
    data = list(range(n))
    if drop_last and n < world:  # torch would hand every rank an empty epoch; we refuse instead
        with pytest.raises(DataError, match="nothing"):
            ResumableSampler(data, world_size=world, drop_last=True)
        return
    for rank in range(world):
        ours = list(ResumableSampler(data, rank=rank, world_size=world, shuffle=False, drop_last=drop_last))
        torch_order = list(DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last))
        assert ours == torch_order


@pytest.mark.parametrize("n, world", [(10, 3), (100, 4), (5, 8)])
def test_sampler_ranks_are_disjoint_and_cover(n: int, world: int) -> None:
    per_rank = [list(ResumableSampler(n, rank=r, world_size=world, seed=7, epoch=2)) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    flat = [i for p in per_rank for i in p]
    total = -(-n // world) * world
    assert len(flat) == total
    counts = np.bincount(flat, minlength=n)
    assert counts.min() >= 1  # every item is seen by some rank
    if n % world == 0:
        assert (counts == 1).all()  # no padding: the ranks are disjoint
    else:
        assert counts.max() <= -(-total // n)  # repeats come only from the padding


def test_sampler_is_a_pure_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        return list(ResumableSampler(1000, seed=seed, epoch=epoch))

    assert order(0, 0) == order(0, 0)
    assert sorted(order(3, 5)) == list(range(1000))
    assert len({tuple(order(s, e)) for s, e in [(0, 0), (0, 1), (1, 0), (1, 1)]}) == 4  # no seed+epoch aliasing


def test_sampler_resumes_with_the_tail() -> None:
    full = list(ResumableSampler(50, rank=1, world_size=3, seed=4, epoch=3))
    for k in [0, 1, 9, 17]:
        s = ResumableSampler(50, rank=1, world_size=3, seed=4)
        s.load_state_dict({"epoch": 3, "position": k})
        assert list(s) == full[k:] and len(s) == len(full) - k
    with pytest.raises(DataError, match="start position"):
        ResumableSampler(50, start=51)


# ----------------------------------------------------------------------------------------------------------
# resumable loader


def _batches(loader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(steps)]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_loader_resume_is_bit_exact(drop_last: bool, rank: int, world: int) -> None:
    ds = DigitsDataset(8, "test", random_flip=True)  # 359 items: epochs end with a partial batch
    kw = dict(batch_size=32, seed=11, rank=rank, world_size=world, drop_last=drop_last)
    reference = make_loader(ds, **kw)
    steps_per_epoch = reference.steps_per_epoch
    total = 3 * steps_per_epoch
    full = _batches(reference, total)
    for k in [1, steps_per_epoch - 1, steps_per_epoch, steps_per_epoch + 3]:
        first = make_loader(ds, **kw)
        _batches(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        resumed = make_loader(ds, **kw, start=state)
        tail = _batches(resumed, total - k)
        for (xa, ya), (xb, yb) in zip(full[k:], tail, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_continues_when_iterated_again_with_workers() -> None:
    ds = DigitsDataset(8, "test", random_flip=True)
    full = _batches(make_loader(ds, batch_size=16, seed=5), 30)
    loader = make_loader(ds, batch_size=16, seed=5, num_workers=2)
    got: list = []
    for stop in [3, 7, 30]:  # abandon the live iterator mid-epoch, start a new one on the same loader
        it = iter(loader)
        while len(got) < stop:
            got.append(next(it))
    loader.close()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, got, strict=True))


def test_loader_epochs_cover_the_rank_share_and_report_position() -> None:
    ds = DigitsDataset(8, "test")
    loader = make_loader(ds, batch_size=50, seed=0, rank=0, world_size=2, drop_last=True)
    n_rank = loader.samples_per_epoch
    assert n_rank == 180 and loader.steps_per_epoch == 3
    it = iter(loader)
    labels = torch.cat([next(it)[1] for _ in range(3)])
    expected = ds.labels[ResumableSampler(ds, rank=0, world_size=2, seed=0).epoch_indices(0)[:150]]
    assert torch.equal(labels, torch.from_numpy(expected))
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0  # 30 left < batch


def test_loader_leaves_the_global_rng_alone() -> None:
    ds = DigitsDataset(8, "test", random_flip=True)
    before = torch.get_rng_state()
    _batches(make_loader(ds, batch_size=64, seed=0), 12)
    assert torch.equal(before, torch.get_rng_state())


def test_loader_rejects_a_foreign_state() -> None:
    ds = DigitsDataset(8, "test")
    state = make_loader(ds, batch_size=8, seed=1).state_dict()
    with pytest.raises(DataError, match="seed"):
        make_loader(ds, batch_size=8, seed=2, start=state)
    with pytest.raises(DataError, match="batch_size"):
        make_loader(ds, batch_size=400)


# ----------------------------------------------------------------------------------------------------------
# latent cache


@pytest.fixture(scope="module")
def digits16() -> DigitsDataset:
    return DigitsDataset(16, "test")  # 359 items -> shards of 100, 100, 100, 59


def _read_all(cache: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((cache / "index.json").read_text())
    parts = [load_file(cache / name) for name in index["shards"]]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def test_latent_cache_round_trip(tmp_path: Path, digits16: DigitsDataset) -> None:
    index = build_latent_cache(
        digits16, avg_pool_encoder, tmp_path / "c", shard_size=100, batch_size=32,
        encoder_name="avgpool", encoder_fingerprint="abc",
    )
    assert index["complete"] and index["count"] == 359 and index["num_shards"] == 4
    assert index["latent_shape"] == [3, 4, 4] and index["encoder"] == {"name": "avgpool", "fingerprint": "abc"}
    ds = LatentDataset(tmp_path / "c", expected_fingerprint="abc")
    assert len(ds) == 359 and ds.num_classes == 10
    for i in [0, 99, 100, 358]:
        z, y = ds[i]
        image, label = digits16[i]
        assert y == label and torch.allclose(z, avg_pool_encoder(image[None])[0], atol=1e-6)
    with pytest.raises(DataError, match="fingerprint"):
        LatentDataset(tmp_path / "c", expected_fingerprint="other")
    with pytest.raises(DataError, match="flip_both"):
        LatentDataset(tmp_path / "c", random_flip=True)


def test_latent_cache_flip_both(tmp_path: Path, digits16: DigitsDataset) -> None:
    build_latent_cache(digits16, avg_pool_encoder, tmp_path, shard_size=200, flip_both=True)
    ds = LatentDataset(tmp_path, random_flip=True)
    kinds = set()
    for epoch in range(12):
        (z, _), _ = ds.load(7, epoch, seed=0)
        image = digits16[7][0][None]
        plain, mirrored = avg_pool_encoder(image)[0], avg_pool_encoder(torch.flip(image, dims=(-1,)))[0]
        kinds.add("plain" if torch.allclose(z, plain) else "mirrored" if torch.allclose(z, mirrored) else "other")
    assert kinds == {"plain", "mirrored"}
    with pytest.raises(DataError, match="random_flip=False"):
        build_latent_cache(DigitsDataset(16, "test", random_flip=True), avg_pool_encoder, tmp_path / "x")


def test_latent_cache_resumes_an_interrupted_build(tmp_path: Path, digits16: DigitsDataset) -> None:
    reference = tmp_path / "ref"
    build_latent_cache(digits16, avg_pool_encoder, reference, shard_size=100, batch_size=50)

    calls = {"n": 0}

    def dying_encoder(images: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 4:  # dies in the middle of the third shard (2 calls per shard)
            raise KeyboardInterrupt("killed")
        return avg_pool_encoder(images)

    cache = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(digits16, dying_encoder, cache, shard_size=100, batch_size=50)
    assert sorted(p.name for p in cache.glob("shard_*")) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert json.loads((cache / "index.json").read_text())["complete"] is False
    with pytest.raises(DataError, match="incomplete"):
        LatentDataset(cache)
    (cache / ".shard_00002.safetensors.999.partial").write_bytes(b"half a shard")  # a killed write

    with pytest.raises(DataError, match="shard_size"):  # other settings must not mix into this cache
        build_latent_cache(digits16, avg_pool_encoder, cache, shard_size=50, batch_size=50)

    seen = []

    def counting_encoder(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.shape[0])
        return avg_pool_encoder(images)

    index = build_latent_cache(digits16, counting_encoder, cache, shard_size=100, batch_size=50)
    assert index["complete"] and sum(seen) == 159  # only shards 2 and 3 were encoded
    assert not list(cache.glob("*.partial"))
    got, want = _read_all(cache), _read_all(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_latent_cache_errors_name_the_file(tmp_path: Path, digits16: DigitsDataset) -> None:
    with pytest.raises(DataError, match="index.json not found"):
        LatentDataset(tmp_path)
    build_latent_cache(digits16, avg_pool_encoder, tmp_path, shard_size=200)
    shard = tmp_path / "shard_00001.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(b"garbage")
    with pytest.raises(DataError, match="shard_00001.safetensors"):
        LatentDataset(tmp_path)
    shard.unlink()
    with pytest.raises(DataError, match="shard_00001.safetensors is missing"):
        LatentDataset(tmp_path)
    shard.write_bytes(good)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="index.json cannot be parsed"):
        LatentDataset(tmp_path)


def test_latent_cache_builds_in_parallel_ranks(tmp_path: Path, digits16: DigitsDataset) -> None:
    first = build_latent_cache(digits16, avg_pool_encoder, tmp_path, shard_size=100, rank=1, world_size=2)
    assert not first["complete"]
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == ["shard_00001.safetensors", "shard_00003.safetensors"]
    assert build_latent_cache(digits16, avg_pool_encoder, tmp_path, shard_size=100, rank=0, world_size=2)["complete"]
    assert len(LatentDataset(tmp_path)) == 359


def test_latent_loader_batches(tmp_path: Path, digits16: DigitsDataset) -> None:
    build_latent_cache(digits16, avg_pool_encoder, tmp_path, shard_size=100)
    z, y = next(iter(make_loader(LatentDataset(tmp_path), batch_size=16)))
    assert z.shape == (16, 3, 4, 4) and y.dtype == torch.int64


# ----------------------------------------------------------------------------------------------------------
# registry


def test_build_dataset(tmp_path: Path, folder: Path) -> None:
    assert len(build_dataset("digits", image_size=8, split="test")) == 359
    assert build_dataset("folder", root=folder, image_size=8).num_classes == 2
    with pytest.raises(ConfigError, match="'nope'"):
        build_dataset("nope")
    with pytest.raises(ConfigError, match="colour"):
        build_dataset("digits", colour=True)
    with pytest.raises(ConfigError, match="root"):
        build_dataset("folder", image_size=8)
