"""The base's linear layers through oneDNN on the CPU: what load_base makes of them, and that they compute F.linear."""
from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.errors import UnsafeEnvironment
from service.model import onednn_linear as onednn_linear_module
from service.model.base_model import load_base
from service.model.onednn_linear import CACHES, KERNEL_CACHE, MOST_ROWS, OneDnnLinear, onednn_dtypes, use_onednn
from service.settings import Settings

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")

INPUTS = {
    "one row": lambda: torch.randn(1, 48),
    "a vector": lambda: torch.randn(48),
    "rows and tokens": lambda: torch.randn(3, 5, 48),
    "four axes": lambda: torch.randn(2, 2, 3, 48),
    "no rows": lambda: torch.randn(0, 48),
    "no tokens": lambda: torch.randn(2, 0, 48),
    "transposed": lambda: torch.randn(48, 7).t(),
    "strided": lambda: torch.randn(4, 3, 96)[..., ::2],
    "offset": lambda: torch.randn(2000)[3:3 + 48 * 9].view(9, 48),
    "the most rows": lambda: torch.randn(MOST_ROWS, 48),
    "the most rows as tokens": lambda: torch.randn(2, MOST_ROWS // 2, 48),
    "a row over the most": lambda: torch.randn(MOST_ROWS + 1, 48),
    "a prompt": lambda: torch.randn(3, 100, 48),
}
ONEDNN_OP = "mkldnn::_linear_pointwise"


def onednn_linear(bias: bool, dtype: torch.dtype = torch.float32) -> OneDnnLinear:
    layer = nn.Linear(48, 80, bias=bias).to(dtype)
    use_onednn(nn.Sequential(layer))
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", INPUTS)
def test_it_computes_f_linear(shape, bias):
    torch.manual_seed(0)
    layer, x = onednn_linear(bias), INPUTS[shape]()
    with torch.no_grad():
        got = layer(x)
    assert isinstance(layer, OneDnnLinear)
    assert got.shape == F.linear(x, layer.weight, layer.bias).shape
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.bfloat16 not in onednn_dtypes(), reason="this CPU's oneDNN has no bfloat16")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", INPUTS)
def test_bfloat16_goes_through_onednn_and_is_the_float32_product_rounded(shape, bias):
    """bfloat16 weights and inputs: oneDNN's product (float32 sums, rounded to bfloat16 once) is the float32 product
    of the same values, rounded, to within a unit of bfloat16 (2^-8 relative: the sums' float32 rounding can tip a
    rounding either way); for rows, oneDNN computes it."""
    torch.manual_seed(0)
    layer, x = onednn_linear(bias, torch.bfloat16), INPUTS[shape]().to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        exact = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    torch.testing.assert_close(got.float(), exact, rtol=2 ** -8, atol=1e-6)
    assert len(onednn_inputs(layer, x)) == (1 if x.numel() else 0)


def onednn_inputs(layer: nn.Module, x: torch.Tensor) -> list[list[int]]:
    """The input shapes of the oneDNN op's calls while ``layer`` computes ``x``."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 record_shapes=True) as profile:
        layer(x)
    return [event.input_shapes[0] for event in profile.events() if event.name == ONEDNN_OP]


@pytest.mark.parametrize("rows, padded", [(1, 1), (3, 4), (9, 16), (16, 16), (17, 24), (24, 24), (37, 40), (40, 40),
                                          (57, 64), (MOST_ROWS, MOST_ROWS), (MOST_ROWS + 1, 65), (300, 300)])
def test_decoding_steps_rows_are_padded_to_a_power_of_two_then_a_multiple_of_8_and_prompts_go_as_they_are(rows, padded):
    """Few rows (decoding steps) meet at most eleven row counts per layer shape, each a kernel oneDNN keeps; prompts'
    row counts are many, and padding them would cost compute for nothing (the kernel caches are bounded). Above 16
    rows a power of two cost up to a third more compute than a multiple of 8 (37 rows took 64's time)."""
    assert onednn_inputs(onednn_linear(bias=True), torch.randn(rows, 48)) == [[padded, 48]]


def test_no_rows_take_f_linear_exactly():
    layer, x = onednn_linear(bias=True), torch.randn(0, 48)
    assert onednn_inputs(layer, x) == []
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_onednn_kernel_caches_are_bounded_unless_the_environment_says(monkeypatch):
    """Unbounded (1,024 entries each), they grew RSS by 595 MB over 300 prompts; the environment's own bound
    stands."""
    for variable in CACHES:
        monkeypatch.setenv(variable, "")  # recorded, so that the test's own values go at its end
        monkeypatch.delenv(variable)
    onednn_linear(bias=False)
    assert [os.environ[variable] for variable in CACHES] == [str(KERNEL_CACHE)] * 2
    monkeypatch.setenv(CACHES[0], "7")
    monkeypatch.setenv(CACHES[1], "9")
    onednn_linear(bias=False)
    assert [os.environ[variable] for variable in CACHES] == ["7", "9"]


def test_onednns_older_name_for_its_cache_bound_stands(monkeypatch):
    for variable in CACHES:
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "1024")
    onednn_linear(bias=False)
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ  # oneDNN would read it first
    assert os.environ["LRU_CACHE_CAPACITY"] == str(KERNEL_CACHE)


@pytest.mark.parametrize("value", ["0", "00", " 0", "abc", "", "+0"])
def test_an_lru_cache_capacity_read_as_zero_is_refused(monkeypatch, value):
    """ideep reads it with atoi; at 0, torch 2.13's oneDNN linear dies of a segmentation fault at its first call."""
    monkeypatch.setenv("LRU_CACHE_CAPACITY", value)
    with pytest.raises(UnsafeEnvironment, match="segmentation fault"):
        use_onednn(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("value", ["1", "-1", " 7", "12abc"])
def test_an_lru_cache_capacity_read_as_another_number_is_kept(monkeypatch, value):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", value)
    assert use_onednn(nn.Sequential(nn.Linear(4, 4))) == 1
    assert os.environ["LRU_CACHE_CAPACITY"] == value


def test_an_input_of_the_wrong_width_gets_f_linears_error():
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        onednn_linear(bias=False)(torch.randn(3, 47))


def test_gradients_flow_through_f_linear():
    """The oneDNN op has no backward: an input that needs gradients takes F.linear, and gets them."""
    torch.manual_seed(0)
    layer = onednn_linear(bias=True)
    x = torch.randn(4, 48, requires_grad=True)
    layer(x).square().sum().backward()
    expected = x.detach().clone().requires_grad_(True)
    F.linear(expected, layer.weight, layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, expected.grad)
    assert layer.weight.grad is not None


BIASES = {"strided": lambda: torch.randn(160)[::2], "expanded": lambda: torch.tensor(0.5).expand(80)}


@pytest.mark.parametrize("bias", BIASES)
def test_a_non_contiguous_bias_is_added_as_f_linear_adds_it(bias):
    """The op reads the bias as contiguous: a strided one gave errors of 3.4, an expanded one of 1.6e17."""
    layer, x = onednn_linear(bias=True), torch.randn(5, 48)
    layer.bias.data = BIASES[bias]()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_a_trainable_bias_alone_gets_its_gradient():
    layer = onednn_linear(bias=True)
    layer.weight.requires_grad_(False)
    layer(torch.randn(3, 48)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((80,), 3.0))


def test_autocast_gives_f_linears_dtype():
    layer, x = onednn_linear(bias=True), torch.randn(3, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == F.linear(x, layer.weight, layer.bias).dtype == torch.bfloat16


def test_a_layer_without_inputs_or_off_the_cpu_takes_f_linear():
    empty = nn.Linear(0, 5)
    use_onednn(nn.Sequential(empty))
    with torch.no_grad():
        assert torch.equal(empty(torch.randn(3, 0)), F.linear(torch.randn(3, 0), empty.weight, empty.bias))
        moved = onednn_linear(bias=True).to("meta")  # as a model moved to a GPU after loading
        assert moved(torch.randn(3, 48, device="meta")).shape == (3, 80)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_dtypes_onednn_does_not_compute_here_take_f_linear(dtype, monkeypatch):
    monkeypatch.setattr(onednn_linear_module, "onednn_dtypes", lambda: (torch.float32,))  # a CPU without bfloat16
    layer = onednn_linear(bias=True, dtype=dtype)
    x = torch.randn(3, 48, dtype=dtype)
    with torch.no_grad():
        assert onednn_inputs(layer, x) == []
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_an_input_of_another_dtype_than_the_weights_gets_f_linears_error():
    layer = onednn_linear(bias=False, dtype=torch.bfloat16)
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        layer(torch.randn(3, 48))


@pytest.mark.parametrize("dtype", onednn_dtypes() if torch.backends.mkldnn.is_available() else ())
def test_a_bias_of_another_dtype_gets_f_linears_error(dtype):
    """Not oneDNN's product, which would read the bias's bytes as the weight's dtype."""
    layer = onednn_linear(bias=True, dtype=dtype)
    layer.bias.data = layer.bias.data.double()
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        layer(torch.randn(3, 48, dtype=dtype))


def test_only_plain_cpu_linears_change_class():
    """Subclasses (bitsandbytes' 4-bit layers are Linear subclasses) and other modules keep their class."""

    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.Embedding(5, 4), nn.LayerNorm(4))
    assert use_onednn(model) == 1
    assert [type(module) for module in model] == [OneDnnLinear, Custom, nn.Embedding, nn.LayerNorm]


@pytest.mark.parametrize("base", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_load_base_on_the_cpu_computes_linears_with_onednn(base, request):
    """Every plain linear of a CPU base is a OneDnnLinear, a tied output head (GPT-2's) still shares the embedding's
    weight, and the logits of a short prompt are the stock model's (GPT-2's Conv1D layers keep torch's product)."""
    base_dir = request.getfixturevalue(base)
    model, _ = load_base(Settings(base_model=str(base_dir), device="cpu"))
    stock, _ = load_base(Settings(base_model=str(base_dir), device="cpu"))
    for module in stock.modules():
        if type(module) is OneDnnLinear:
            module.__class__ = nn.Linear
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert linears and all(type(module) is OneDnnLinear for module in linears)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == (base == "tiny_gpt2_dir")
    for shape in ((2, 9), (2, 40)):  # 18 rows, a decoding step's size; 80, a prompt's
        ids = torch.randint(3, 200, shape)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, stock(ids).logits, rtol=1e-4, atol=1e-4)


def test_load_base_without_onednn_keeps_torchs_linears(tiny_llama_dir):
    model, _ = load_base(Settings(base_model=str(tiny_llama_dir), device="cpu", onednn=False))
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert linears and all(type(module) is nn.Linear for module in linears)


@pytest.mark.parametrize("dtype, onednn",
                         [("float16", True), ("bfloat16", False), ("bfloat16", True), ("float32", False)])
def test_a_base_whose_linears_take_f_linear_in_less_than_float32_on_the_cpu_is_warned_of(dtype, onednn, tiny_llama_dir,
                                                                                        caplog):
    """Torch's own bfloat16 and float16 products on the CPU take longer than float32's (docs/benchmarks.md): a user
    asking for less precision to go faster is told when that is what they get."""
    with caplog.at_level(logging.WARNING, logger="service.model.base_model"):
        load_base(Settings(base_model=str(tiny_llama_dir), device="cpu", dtype=dtype, onednn=onednn))
    slow = dtype != "float32" and not (onednn and getattr(torch, dtype) in onednn_dtypes())
    assert ("slower than float32" in caplog.text) == slow
