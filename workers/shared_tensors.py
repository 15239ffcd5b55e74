"""A cache entry's tensors through Ray's object store without a copy per worker.

Ray deserializes a torch tensor by copying it into the worker's own memory, but hands a numpy array out as a
read-only view of the object store's shared memory. So the driver puts each tensor as its raw bytes (a uint8
array, which also carries bf16, that numpy lacks) with its dtype and shape, and every worker on a node views
the same pages: a 7B NF4 entry costs its 4 GB once per node, not once more in every training worker.

The views are read-only. The base's tensors are frozen (packed codes, scales, embeddings, norms): nothing
writes into them; a module cast or a ZeRO-3 partition makes new tensors instead.
"""

from __future__ import annotations

import warnings

import torch

SharedTensors = dict[str, tuple[str, tuple[int, ...], object]]  # name -> (dtype name, shape, uint8 numpy array)


def to_shared(tensors: dict[str, torch.Tensor]) -> SharedTensors:
    """Each tensor as (dtype, shape, its bytes as a numpy uint8 array): what to `ray.put`."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        out[name] = (str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy())
    return out


def from_shared(shared: SharedTensors) -> dict[str, torch.Tensor]:
    """The tensors again, as views of the arrays' memory (no copy)."""
    out = {}
    with warnings.catch_warnings():  # the arrays are read-only views of the object store, by design (see above)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (dtype, shape, data) in shared.items():
            if data.size == 0:  # numpy gives an empty array stride 0, which torch cannot view as another dtype
                out[name] = torch.empty(shape, dtype=getattr(torch, dtype))
                continue
            out[name] = torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)
    return out
