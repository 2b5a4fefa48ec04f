"""Fixtures shared by the SAM2 tests: one torch thread, and SAM2 built with random weights."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread: on a shared 2-core box two threads cost 5-10x the CPU time."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_sam2(seed: int):
    """SAM2.1 tiny at image size 128 with random weights drawn after ``torch.manual_seed(seed)``.

    Seed 0 sees every prompted person (object score > 0) with a mask over part of the frame;
    seed 6 sees nobody.
    """
    torch = pytest.importorskip("torch")
    build = pytest.importorskip("sam2.build_sam").build_sam2_video_predictor
    torch.manual_seed(seed)
    return build(
        "configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu",
        hydra_overrides_extra=["++model.image_size=128"], apply_postprocessing=False,
    )


@pytest.fixture(scope="module")
def sam2_model():
    return build_sam2(0)


@pytest.fixture(scope="session")
def sam2_builder():
    """:func:`build_sam2`, for tests that need another seed."""
    return build_sam2
