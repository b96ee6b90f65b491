"""Linear layers that read one input (a decoder layer's q/k/v projections, its gate and up projections) computed as
one product on the CPU.

Each oneDNN inner product has a cost of its own beyond its arithmetic, and a Llama layer reads its attention's input
through three and its MLP's through two. SmolLM2's body (30 layers) took 0.94x as long with both fused for one
token, 0.94x for 8 and 0.93x for 24, its outputs equal to the last bit (docs/benchmarks.md, "Fused projections").
The layers' weights become views of the rows of one weight, in a map of its own (``file_pages.mapped_zeros``), and
their pages of the model file leave memory (``file_pages.release``): about the same RSS for one process, but those
278 MB of SmolLM2 are now private memory, which the kernel cannot drop and servers on one host cannot share, where
the file's clean pages were both (a review measured two servers on one cache: +160 MB PSS each). Merging an adapter
into the base writes those rows in place, and unmerging copies the weights as loaded (those file pages, or a copy
made at the first merge where the weights were not loaded from a file) back (``LoraLayers.merge``).
"""
from __future__ import annotations

import torch
from torch import nn

from service.model.file_pages import mapped_zeros, private_file_maps, release
from service.model.onednn_linear import MOST_ROWS, OneDnnLinear, computes_through_onednn, inner_product


class FusedLinears:
    """``OneDnnLinear`` layers that read one input, their weights views of one weight [sum of outs, in]; each layer's
    forward hands its input to ``output``, which computes every layer's product once per input tensor."""

    def __init__(self, layers: list[OneDnnLinear]):
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        first = layers[0].weight
        self.weight = mapped_zeros((sum(self.sizes), first.shape[1]), first.dtype)
        self.bias = None if layers[0].bias is None else torch.cat([layer.bias.detach() for layer in layers])
        self.originals = {}  # layer -> its weight as loaded, where pages of the model file hold it (out of memory)
        maps = private_file_maps()
        for layer, rows in zip(layers, self.weight.split(self.sizes)):
            original = layer.weight.data
            layer.weight.data = rows.copy_(original)
            layer.fused = self
            if release(original, maps):
                self.originals[layer] = original
        self._input: torch.Tensor | None = None  # the input whose products are held, until every layer took its own
        self._outputs: dict[OneDnnLinear, torch.Tensor] = {}

    def output(self, layer: OneDnnLinear, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s product of ``x`` [..., in]: [..., out]. Up to ``MOST_ROWS`` rows (decoding steps, short
        prompts), a view of the products of every layer, computed at the first layer to ask for an input tensor and
        dropped once each took its own; above, its own product: one product gains less the more rows it has, and a
        view's strides cost the products and element-wise work after it (docs/benchmarks.md, "Fused projections")."""
        if x.numel() > MOST_ROWS * x.shape[-1]:
            return inner_product(x, layer.weight, layer.bias)
        if x is not self._input or layer not in self._outputs:
            products = inner_product(x, self.weight, self.bias).split(self.sizes, dim=-1)
            self._input, self._outputs = x, dict(zip(self.layers, products))
        out = self._outputs.pop(layer)
        if not self._outputs:  # do not keep the step's tensors alive past it
            self._input = None
        return out


def fuse(layers: list[nn.Module]) -> FusedLinears | None:
    """Fuse ``layers`` (modules that read one input tensor) when there are several, all ``OneDnnLinear`` computing
    through oneDNN (``onednn_linear.computes_through_onednn``), of one dtype and one input width, all with a bias or
    none; None otherwise."""
    fusable = (len(layers) > 1 and all(type(layer) is OneDnnLinear and computes_through_onednn(layer)
                                       for layer in layers)
               and len({(layer.weight.dtype, layer.in_features, layer.bias is None) for layer in layers}) == 1)
    return FusedLinears(layers) if fusable else None
