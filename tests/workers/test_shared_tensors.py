"""Entry tensors through Ray's object store as views, not copies (workers/shared_tensors.py)."""

from __future__ import annotations

import pytest
import torch

from workers.shared_tensors import from_shared, to_shared


def test_every_dtype_round_trips_exactly_as_a_view_of_the_bytes():
    tensors = {"codes": torch.randint(0, 255, (64, 32), dtype=torch.uint8),
               "scales": torch.randn(64, 2).to(torch.bfloat16), "half": torch.randn(3, 5).half(),
               "rest": torch.randn(7), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4)}
    shared = to_shared(tensors)
    back = from_shared(shared)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name
        if t.numel():
            assert back[name].data_ptr() == shared[name][2].ctypes.data  # a view of the bytes, not a copy


def test_what_a_ray_worker_gets_is_a_view_of_the_object_store(ray_session):
    ray = ray_session
    ref = ray.put(to_shared({"w": torch.arange(1 << 20, dtype=torch.int32)}))

    @ray.remote
    def probe(refs):
        shared = ray.get(refs[0])
        t = from_shared(shared)["w"]
        return bool(shared["w"][2].flags.writeable), int(t[-1]), t.dtype == torch.int32

    writeable, last, dtype_kept = ray.get(probe.remote([ref]))
    assert not writeable and last == (1 << 20) - 1 and dtype_kept  # read-only: the store's own pages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_non_contiguous_tensor_is_stored_contiguously(dtype):
    t = torch.randn(8, 6).to(dtype).t()
    assert torch.equal(from_shared(to_shared({"t": t}))["t"], t)
