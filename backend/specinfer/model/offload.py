"""Offloading: decoder layers' weights in host memory, streamed to the device for every forward.

For a model larger than the GPU (the paper's offloading setting): the layers' weights stay in host
memory (pinned, on CUDA) and each forward copies them, one layer at a time, into ``BUFFERS`` layers
resident on the device. The copy of layer ``i + 1`` is issued on a side stream before layer ``i``
computes, so the two overlap; events order a buffer's copy after the compute that last read it
(``free``) and its compute after its copy (``ready``), without the host waiting for either.

A forward then costs about the time to move the weights, whatever the number of tokens fed, which
is why verifying a whole token tree costs about what decoding one token costs here.

Without CUDA the same bookkeeping runs with host buffers: the copy is a plain ``copy_`` on the
calling thread, done before the layer is handed out (how the CPU tests check which layer is where).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

OFFLOAD = ("none", "cpu")  # where the decoder layers' weights live between forwards
BUFFERS = 2  # device-resident layers: one computes while the next is copied in


class LayerStreamer:
    """Iterating yields ``layers`` in order, each as one of the device buffers holding its weights.

    ``layers`` stay the weights' owner, in host memory; a buffer is a copy of ``layers[0]`` (the same
    module class, so the layer code is the model's) whose ``self_attn.layer`` is set to the layer it
    holds, so that it reads and writes that layer's KV cache.
    """

    def __init__(self, layers: nn.ModuleList, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        layers.to("cpu")
        if self.cuda:
            for p in layers.parameters():
                p.data = p.data.pin_memory()  # asynchronous copies need page-locked sources
        self.host = [[p.detach() for p in layer.parameters()] for layer in layers]
        self.buffers = [copy.deepcopy(layers[0]).to(self.device).requires_grad_(False)
                        for _ in range(min(BUFFERS, len(layers)))]
        self.held = [-1] * len(self.buffers)  # layer whose weights each buffer holds (or is receiving)
        self.copies = 0  # layers copied into buffers so far
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event() for _ in self.buffers]
            self.free = [torch.cuda.Event() for _ in self.buffers]

    def modules(self) -> Iterator[nn.Module]:
        """The buffers' modules (``Transformer.batch_invariant`` sets their linear layers and norms too)."""
        for buffer in self.buffers:
            yield from buffer.modules()

    def load(self, layer: int) -> None:
        """Start copying ``layer``'s weights into its buffer (on CUDA: queued on the side stream)."""
        j = layer % len(self.buffers)
        dst = self.buffers[j].parameters()
        if self.cuda:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self.free[j])  # the layer that last used buffer j has computed
                for d, s in zip(dst, self.host[layer]):
                    d.copy_(s, non_blocking=True)
                self.ready[j].record(self.stream)
        else:
            for d, s in zip(dst, self.host[layer]):
                d.copy_(s)
        self.held[j] = layer
        self.copies += 1

    def __iter__(self) -> Iterator[nn.Module]:
        n, nb = len(self.host), len(self.buffers)
        self.load(0)
        for i in range(n):
            if i + 1 < n:
                self.load(i + 1)  # overlaps layer i's compute
            j = i % nb
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self.ready[j])
            buffer = self.buffers[j]
            buffer.self_attn.layer = i
            yield buffer
            if self.cuda:
                self.free[j].record(torch.cuda.current_stream(self.device))
