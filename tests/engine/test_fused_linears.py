"""Linear layers that read one input, computed as one product on the CPU (service.model.fused_linears)."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from service.lora.layers import LoraLayers
from service.model.base_model import load_base
from service.model.fused_linears import fuse
from service.model.onednn_linear import MOST_ROWS, OneDnnLinear, onednn_dtypes, use_onednn
from service.settings import Settings
from tests.lora_helpers import load_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
ONEDNN_DTYPES = onednn_dtypes() if torch.backends.mkldnn.is_available() else ()


def linears(outs=(48, 16, 16), width=32, bias=False, seed=0, dtype=torch.float32) -> list[nn.Linear]:
    torch.manual_seed(seed)
    layers = nn.ModuleList(nn.Linear(width, out, bias=bias) for out in outs).requires_grad_(False).to(dtype)
    use_onednn(layers)
    return list(layers)


@pytest.mark.parametrize("dtype", ONEDNN_DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (3, 1), (2, 8), (1, 24), (4, 33), (1, 200)])
def test_each_layer_gets_what_it_computed_alone_to_the_last_bit(bias, shape, dtype):
    alone, layers = linears(bias=bias, dtype=dtype), linears(bias=bias, dtype=dtype)
    fused = fuse(layers)
    assert fused is not None and all(layer.fused is fused for layer in layers)
    x = torch.randn(*shape, 32).to(dtype)
    with torch.no_grad():
        expected = [layer(x) for layer in alone]
        got = [layer(x) for layer in layers]
    assert all(torch.equal(a, b) and b.shape == (*shape, a.shape[-1]) for a, b in zip(expected, got))


def test_the_weights_become_rows_of_one_weight_with_the_same_values():
    layers = linears()
    values = [layer.weight.clone() for layer in layers]
    fused = fuse(layers)
    assert fused.weight.shape == (80, 32)
    assert all(torch.equal(layer.weight, value) for layer, value in zip(layers, values))
    assert [layer.weight.data_ptr() - fused.weight.data_ptr() for layer in layers] == [0, 48 * 32 * 4, 64 * 32 * 4]
    assert fused.originals == {}  # not loaded from a file: nothing kept (a merge keeps a copy)


def test_a_new_input_is_computed_anew_and_a_layer_asked_twice_gets_the_same():
    alone, layers = linears(), linears()
    fuse(layers)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(2, 3, 32)
            assert torch.equal(layers[1](x), alone[1](x))  # the others never asked
            assert torch.equal(layers[1](x), alone[1](x))
            assert torch.equal(layers[0](x), alone[0](x)) and torch.equal(layers[2](x), alone[2](x))
        x.add_(1)  # the same tensor, written: a new cycle computes it again
        assert all(torch.equal(layer(x), single(x)) for layer, single in zip(layers, alone))


@pytest.mark.parametrize("shape", [(1, 64), (8, 8), (1, 65), (3, 40)])
def test_up_to_most_rows_one_product_is_shared_and_above_each_layer_computes_its_own(shape):
    alone, layers = linears(), linears()
    fused = fuse(layers)
    x = torch.randn(*shape, 32)
    with torch.no_grad():
        assert torch.equal(layers[0](x), alone[0](x))
        shared = fused._input is x
        assert all(torch.equal(layer(x), single(x)) for layer, single in zip(layers[1:], alone[1:]))
    assert shared == (shape[0] * shape[1] <= MOST_ROWS) and fused._input is None


def test_what_onednn_does_not_take_goes_to_f_linear_over_the_rows():
    alone, layers = linears(), linears()
    fuse(layers)
    x = torch.randn(2, 32, requires_grad=True)
    with torch.enable_grad():
        out = layers[2](x)
    assert out.requires_grad and torch.allclose(out, alone[2](x), atol=1e-6)


@pytest.mark.parametrize("case", ["one layer", "mkl", "mixed bias", "widths", "float64", "float16", "mixed dtypes"])
def test_what_cannot_be_fused_is_left_alone(case):
    layers = {"one layer": lambda: linears(outs=(8,)),
              "mkl": lambda: [nn.Linear(32, 8), nn.Linear(32, 8)],
              "mixed bias": lambda: [linears(bias=True)[0], linears()[1]],
              "widths": lambda: [linears()[0], linears(width=16)[0]],
              "float64": lambda: linears(dtype=torch.float64),
              "float16": lambda: linears(dtype=torch.float16),
              "mixed dtypes": lambda: [linears()[0], linears(dtype=torch.bfloat16)[1]]}[case]()
    weights = [layer.weight.data_ptr() for layer in layers]
    assert fuse(layers) is None
    assert [layer.weight.data_ptr() for layer in layers] == weights
    assert all(getattr(layer, "fused", None) is None for layer in layers)


def test_a_tiny_llamas_projections_are_fused_by_their_input(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    with torch.no_grad():
        before = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    layers = LoraLayers(model, num_slots=2)
    groups = {id(layer.base.fused): name.rsplit(".", 1)[-1] for name, layer in layers.modules.items()
              if isinstance(layer.base, OneDnnLinear) and layer.base.fused is not None}
    members = sorted(name.rsplit(".", 1)[-1] for name, layer in layers.modules.items()
                     if getattr(layer.base, "fused", None) is not None)
    assert len(groups) == 2 * model.config.num_hidden_layers
    assert members == sorted(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"] * model.config.num_hidden_layers)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[1, 2, 3, 4, 5]])).logits, before)


def file_resident_bytes(path: Path) -> int:
    """Resident bytes of this process's maps of the file at ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.smollm2
def test_smollm2s_fused_weights_leave_their_file_pages_out_of_memory():
    """The fused weights are copies: the pages of the model file they were copied from leave memory at once, so the
    model's memory does not grow by the fused layers' 278 MB. (A later read of a neighbouring weight may map some back:
    the kernel maps the page cache's pages around a fault, clean pages it can drop again.)"""
    model, _ = load_base(Settings(device="cpu"))
    path = (Path(Settings().cache_dir) / "smollm2-135m-instruct" / "model.safetensors").resolve()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # every weight read: every page of the file mapped
    assert file_resident_bytes(path) > path.stat().st_size - 8e6
    LoraLayers(model, num_slots=2)
    fused = sum(parameter.numel() * 4 for name, parameter in model.named_parameters()
                if re.search(r"(q|k|v|gate|up)_proj", name))
    assert fused > 250e6
    assert file_resident_bytes(path) < path.stat().st_size - fused + 8e6
