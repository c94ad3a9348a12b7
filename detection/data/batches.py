"""What crosses from the loader's workers to the training process, and how cheaply.

A worker hands each tensor's storage to the training process through shared memory: a new
segment (its pages faulted in and zeroed by the kernel), a file descriptor and a socket round
trip per storage. A detection sample has seven tensors (image, boxes, labels, image_id, area,
iscrowd, orig_size) and its image is the bulk of the bytes, so the worker side:

- keeps images ``uint8`` (a quarter of the bytes of ``float32``) where the transforms left them
  ``uint8`` (``data.train_pipeline``, evaluation, default-pipeline images that need no resize):
  the dataset's copy in a worker has ``float_images = False``, and the training process makes
  them float, in the pinning thread when the loader pins memory (straight into page-locked
  memory) or as it yields them;
- copies the whole batch into ONE shared-memory block (:func:`share_in_one_block`), the copy that
  moving each tensor to shared memory would make anyway, so a batch costs one segment.

The values are those of converting in the worker: ``uint8 / 255`` in float32 either way.
"""

from __future__ import annotations

from typing import Any

import torch

from detection.data.transforms import image_to_float

_ALIGN = 64  # bytes; any dtype's view can start at such an offset


class Batch(tuple):
    """``(images, targets)`` as :func:`detection.data.loader.collate` makes it; unpacks like the
    plain pair. The DataLoader's pinning thread calls :meth:`pin_memory`."""

    def to_float(self) -> "Batch":
        """The batch with uint8 images made float in 0..1 (float images are kept as they are)."""
        images, targets = self
        if all(image.is_floating_point() for image in images):
            return self
        return Batch(([image_to_float(image) for image in images], targets))

    def pin_memory(self, device: Any = None) -> "Batch":
        """Page-locked copies; uint8 images are converted to float straight into them."""
        images, targets = self
        pinned = []
        for image in images:
            if image.is_floating_point():
                pinned.append(image.pin_memory())
            else:
                out = torch.empty(image.shape, dtype=torch.float32, pin_memory=True)
                pinned.append(torch.div(image, 255.0, out=out))
        pinned_targets = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                          for t in targets]
        return Batch((pinned, pinned_targets))


def share_in_one_block(tree: Any) -> Any:
    """``tree`` (lists, tuples and dicts of tensors) with every tensor copied into one block of
    shared memory, as views of it (see the module docstring)."""
    tensors: list[torch.Tensor] = []

    def collect(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            tensors.append(node)
        elif isinstance(node, (list, tuple)):
            for item in node:
                collect(item)
        elif isinstance(node, dict):
            for item in node.values():
                collect(item)

    collect(tree)
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(total, _ALIGN)))
    copies = {}
    for tensor, offset in zip(tensors, offsets):
        size = tensor.numel() * tensor.element_size()
        view = block[offset : offset + size].view(tensor.dtype).view(tensor.shape)
        copies[id(tensor)] = view.copy_(tensor)

    def rebuild(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            return copies[id(node)]
        if isinstance(node, (list, tuple)):
            return type(node)(rebuild(item) for item in node)
        if isinstance(node, dict):
            return {key: rebuild(item) for key, item in node.items()}
        return node

    return rebuild(tree)
