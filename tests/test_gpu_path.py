"""The GPU path's logic, tested on the CPU: the precision each device gets, fenced buffer reuse,
batches of one pixel size, decode processes sized to the cores and /dev/shm, the float16
overflow check, on-device resizing and padding, and where training bags live."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from mil_cli.backbones import get_backbone
from mil_cli.devices import inference_dtype, native_bf16, training_dtype
from mil_cli.embedding import (BlockReader, Embedder, FencedRing, Rebatcher, SlideAssembly, SlideJob, Batch,
                               block_specs, default_workers, loader_plan)
from mil_cli.errors import MilcliError
from mil_cli.training import Bag, collate, device_dtype

from conftest import SAMPLE

SLIDE = SAMPLE / "slides" / "slide_00.tif"


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True),
                                                    ((8, 9), True), ((9, 0), True), ((10, 0), True)])
def test_bf16_is_native_from_ampere_on(capability: tuple[int, int], native: bool) -> None:
    """V100 (7.0) and T4 (7.5) emulate bf16, though torch.cuda.is_bf16_supported() says yes."""
    assert native_bf16(capability) is native


def test_precision_follows_what_the_device_runs_natively() -> None:
    assert inference_dtype("bf16", bf16_native=True) == torch.bfloat16
    assert inference_dtype("bf16", bf16_native=False) == torch.float16  # a T4 runs UNI in fp16, not emulated bf16
    assert inference_dtype("fp16", bf16_native=True) == torch.float16
    assert inference_dtype("fp32", bf16_native=True) is None
    assert training_dtype("auto", "cuda", bf16_native=True) == torch.bfloat16
    assert training_dtype("auto", "cuda", bf16_native=False) is None  # fp32 on a V100, not emulated bf16
    assert training_dtype("auto", "cpu", bf16_native=True) is None    # CPUs stay fp32 unless asked
    assert training_dtype("bf16", "cpu", bf16_native=False) == torch.bfloat16
    assert training_dtype("fp32", "cuda", bf16_native=True) is None


class RecordingFence:
    """Stands in for a CUDA event: records when it was set and when it was waited on."""

    def __init__(self, log: list, name: int) -> None:
        self.log, self.name = log, name
        log.append(("set", name))

    def wait(self) -> None:
        self.log.append(("wait", self.name))


def test_a_buffer_is_handed_out_again_only_after_its_fence() -> None:
    log: list = []
    fences = iter(range(100))
    ring = FencedRing(3, pinned=False, make_fence=lambda: RecordingFence(log, next(fences)))
    seen = []
    for step in range(7):
        slot, buffer = ring.take((4, 2), torch.float32)
        log.append(("take", slot))
        buffer.fill_(step)
        seen.append((slot, buffer.data_ptr()))
        ring.fence(slot)
    assert [slot for slot, _ in seen] == [0, 1, 2, 0, 1, 2, 0]
    assert len({ptr for _, ptr in seen}) == 3  # three buffers, reused
    # slot 0's second use waits on the fence set at its first use (fence 0), and only then is taken
    assert log.index(("wait", 0)) < log.index(("take", 0), log.index(("set", 2)))
    waits = [name for kind, name in log if kind == "wait"]
    assert waits == [0, 1, 2, 3]  # every reuse waited on exactly the previous use of that buffer
    slot, bigger = ring.take((8, 2), torch.float32)  # a larger request grows the buffer
    assert bigger.shape == (8, 2)


def test_batches_hold_one_pixel_size_and_keep_their_order() -> None:
    ring = FencedRing(2, pinned=False, make_fence=lambda: None)
    rebatcher = Rebatcher(size=4, allocate=ring.take)
    batches = []
    for j, (n, side) in enumerate([(3, 8), (2, 8), (3, 6), (1, 6)]):
        images = torch.full((n, side, side, 3), j, dtype=torch.uint8)
        for batch in rebatcher.add(images, j, torch.arange(n), torch.ones(n, dtype=torch.bool)):
            batches.append((batch.images.clone(), batch.slide_index.clone(), batch.slot))
            ring.fence(batch.slot)
    batches += [(b.images.clone(), b.slide_index.clone(), b.slot) for b in rebatcher.flush()]
    assert [(len(images), images.shape[1]) for images, _, _ in batches] == [(4, 8), (1, 8), (4, 6)]
    assert torch.cat([index for _, index, _ in batches]).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3]
    assert all((images[:, 0, 0, 0] == index).all() for images, index, _ in batches)
    assert [slot for _, _, slot in batches] == [0, 1, 0]


def test_decode_processes_fit_the_cores_and_shared_memory() -> None:
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_workers(gpu, cores=16) == 15 and default_workers(gpu, cores=1) == 1
    assert default_workers(cpu, cores=16) == 0
    block = 16 * 256 * 256 * 3  # 3 MiB
    assert loader_plan(15, block, 64 << 30) == (15, 4)    # plenty of /dev/shm
    assert loader_plan(15, block, 64 << 20) == (10, 1)    # Docker's 64 MB: 10 blocks in flight, not 60
    assert loader_plan(4, block, 64 << 20) == (4, 2)
    assert loader_plan(8, block, 1 << 20) == (1, 1)       # always at least one
    assert loader_plan(0, block, 1 << 20) == (0, 4)       # decoding inline uses no /dev/shm
    assert loader_plan(8, block, None) == (8, 4)


def test_features_beyond_float16_end_the_run_with_the_reason() -> None:
    jobs = [SlideJob("s1", SLIDE, np.zeros((2, 2), np.int64), 256, {})]
    batch = Batch(torch.zeros(2, 1, 1, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), torch.arange(2),
                  torch.ones(2, dtype=torch.bool))
    SlideAssembly(jobs, np.float32).add(batch, np.full((2, 3), 1e5, np.float32))  # float32 holds it
    with pytest.raises(MilcliError, match=r"reach 1e\+05 on s1, beyond float16's range .*--dtype float32"):
        SlideAssembly(jobs, np.float16).add(batch, np.full((2, 3), 1e5, np.float32))
    nan = np.ones((2, 3), np.float32)
    nan[1, 2] = np.nan
    with pytest.raises(MilcliError, match="NaN or infinite features on s1"):
        SlideAssembly(jobs, np.float32).add(batch, nan)
    undecoded = Batch(batch.images, batch.slide_index, batch.rows, torch.tensor([True, False]))
    assert SlideAssembly(jobs, np.float16).add(undecoded, np.where(np.arange(2)[:, None] == 1, 1e5, 1.0)
                                               .astype(np.float32).repeat(3, 1)) == [0]  # its patch is dropped anyway


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(get_backbone("efficientnet-lite0"), torch.device("cpu"))


def test_native_size_patches_resized_on_the_device_match_the_readers_resize(embedder: Embedder) -> None:
    """The GPU path ships 256-px reads as they are and resizes on the device; the CPU path's
    reader resizes in uint8 first. Both must give the same features (within rounding)."""
    coords = np.array([[x, 512] for x in range(0, 1024, 256)], dtype=np.int64)
    [spec] = block_specs([SlideJob("s", SLIDE, coords, 256, {})])
    native, _, _, _ = BlockReader(224, resize=False)[spec]
    resized, _, _, _ = BlockReader(224, resize=True)[spec]
    assert native.shape == (4, 256, 256, 3) and resized.shape == (4, 224, 224, 3)
    on_device, by_reader = embedder(native), embedder(resized)
    assert on_device.shape == by_reader.shape == (4, 1280)
    cosine = torch.nn.functional.cosine_similarity(on_device, by_reader)
    assert cosine.min() > 0.99


def test_a_padded_batch_gives_the_unpadded_features(embedder: Embedder) -> None:
    """Under --compile every batch is padded to the batch size (one shape, one compilation)."""
    images = torch.randint(0, 255, (3, 224, 224, 3), dtype=torch.uint8)
    plain = embedder(images)
    embedder.pad_to = 8
    try:
        padded = embedder(images)
    finally:
        embedder.pad_to = None
    assert padded.shape == (3, 1280) and torch.allclose(plain, padded, atol=1e-4)


def test_training_bags_go_to_the_gpu_in_fp16_only_when_they_fit() -> None:
    gib = 1 << 30
    assert device_dtype(1_000_000_000, 30.0, free_bytes=80 * gib) == torch.float16   # 2 GB of 80 GiB
    assert device_dtype(1_000_000_000, 1e6, free_bytes=80 * gib) == torch.float32    # beyond fp16: fp32
    assert device_dtype(30_000_000_000, 30.0, free_bytes=80 * gib) is None           # 60 GB: stays on the host
    half = torch.randn(5, 4).half()
    x, mask, targets = collate([Bag("a", half, 1, "a"), Bag("b", half[:2], 0, "b")], torch.device("cpu"))
    assert x.dtype == torch.float32 and x.shape == (2, 5, 4)  # fp16 bags are padded and computed in fp32
    assert torch.equal(x[0], half.float()) and torch.equal(x[1, :2], half[:2].float()) and not x[1, 2:].any()
    assert mask.tolist() == [[True] * 5, [True, True, False, False, False]] and targets.tolist() == [1, 0]


def test_persistent_decode_processes_start_once_and_serve_later_slides() -> None:
    """A Ray GPU worker forks its decoders before CUDA is initialised and keeps them for every
    slide it is given: the same processes must decode slide after slide, correctly."""
    from mil_cli.embedding import BlockDecoder

    decoder = BlockDecoder(224, resize=True, workers=2, persistent=True)
    decoder.start()
    started = [w.pid for w in decoder.loader._iterator._workers]
    assert len(started) == 2 and all(w.is_alive() for w in decoder.loader._iterator._workers)
    reference = BlockReader(224, resize=True)
    for offset in (0, 512):
        coords = np.array([[x, offset] for x in range(0, 1024, 256)], dtype=np.int64)
        job = SlideJob(f"s{offset}", SLIDE, coords, 256, {})
        blocks = list(decoder.blocks([job]))
        assert sorted(r for _, _, rows, _ in blocks for r in rows.tolist()) == [0, 1, 2, 3]
        for pixels, _, rows, ok in blocks:
            expected = reference[next(s for s in block_specs([job]) if s.rows.tolist() == rows.tolist())][0]
            assert ok.all() and torch.equal(pixels, expected)
        assert [w.pid for w in decoder.loader._iterator._workers] == started
