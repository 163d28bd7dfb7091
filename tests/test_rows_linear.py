"""The CPU kernel for generated tokens' linear layers (``kernels/rows_linear``): a row's result is
bit-identical whatever rows share its call (count, position, tile shapes), close to a float64
reference, on the native build and on the portable one (no ``avx512_bf16``); the negative control
(the same products summed in another order) is not bit-identical; a model layer's packed copy of
its weight follows the weight."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from specinfer.kernels import cpu_library
from specinfer.kernels.rows_linear import fits, pack, rows_linear

pytestmark = pytest.mark.skipif(cpu_library.library() is None, reason="no C++ compiler: generated tokens take the GEMMs")

SHAPES = [(1, 32), (3, 64), (17, 576), (102, 96), (960, 576), (576, 1536), (4099, 576)]  # (out, in): tails of 0-3


def layer(out_features: int, in_features: int, seed: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).bfloat16()
    return w, (torch.randn(out_features, generator=g).bfloat16() if bias else None)


def kernel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return rows_linear(x, w, pack(w), b)


def alone(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, linear=kernel) -> torch.Tensor:
    return torch.cat([linear(row[None], w, b) for row in x])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_a_row_gets_its_bits_whatever_shares_the_call(shape, bias):
    """Every row count from 1 to 37 (the row-major weight's tiles at 1-2 rows, the packed blocks in
    groups of 4 rows up to 8 and past it with shared fetching, and their remainders; output counts
    off the 4-row block), rows in another order, against each row computed alone."""
    w, b = layer(*shape, seed=shape[0], bias=bias)
    packed = pack(w)
    x = torch.randn(37, shape[1], generator=torch.Generator().manual_seed(1)).bfloat16()
    want = alone(x, w, b)
    for m in range(2, 38):
        assert torch.equal(rows_linear(x[:m], w, packed, b), want[:m]), m
    order = torch.randperm(37, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rows_linear(x[order], w, packed, b), want[order])
    assert torch.equal(rows_linear(x.view(37, 1, -1), w, packed, b), want.view(37, 1, -1))  # any leading shape
    reference = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert torch.allclose(want.double(), reference, rtol=2 ** -7, atol=1e-3)  # bfloat16's rounding of the sum


def test_the_negative_control_sums_in_another_order():
    """The same products summed in another order (the input width permuted in both operands) round
    apart somewhere: bit-equality above is a property of the kernel's order, not of the data (float32
    sums in another order flip a bfloat16 result about 3 times in 100,000: ~15 expected here)."""
    w, b = layer(8192, 576, seed=3, bias=False)
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(4)).bfloat16()
    perm = torch.randperm(576, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(kernel(x, w, b), kernel(x[:, perm].contiguous(), w[:, perm].contiguous(), b))


@pytest.mark.skipif("avx512_bf16" not in cpu_library.cpu_flags(),
                    reason="the native build is the portable one already (no avx512_bf16)")
def test_the_portable_build_is_batch_invariant_too(tmp_path, monkeypatch):
    """Built without ``avx512_bf16`` (two FMAs of widened halves per chunk): the same property, on
    the same shapes, on a CPU that lacks the instruction."""
    monkeypatch.setenv("SPECINFER_CACHE", str(tmp_path))
    compiler = shutil.which("c++") or shutil.which("g++")
    portable = cpu_library.build(compiler, ("-mno-avx512bf16",))

    def linear(x, w, b):
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
        assert portable.rows_linear(x.data_ptr(), w.data_ptr(), pack(w).data_ptr(), 0 if b is None else b.data_ptr(), out.data_ptr(),
                                    x.shape[0], x.shape[1], w.shape[0]) == 0
        return out

    for shape in SHAPES[1:5]:
        w, b = layer(*shape, seed=6, bias=True)
        x = torch.randn(22, shape[1], generator=torch.Generator().manual_seed(7)).bfloat16()
        want = alone(x, w, b, linear)
        for m in (2, 3, 4, 5, 8, 9, 13, 22):  # every tiling: 2 rows, groups of 4 up to 8 rows and past it
            assert torch.equal(linear(x[:m].contiguous(), w, b), want[:m]), (shape, m)
        reference = F.linear(x.double(), w.double(), b.double())
        assert torch.allclose(want.double(), reference, rtol=2 ** -7, atol=1e-3)


def test_layers_the_kernel_does_not_fit_keep_the_gemms():
    """float32 layers, input widths off the 32-value chunk and non-contiguous weights keep ``F.linear``;
    packing or calling the kernel on them is an error, not a silent wrong answer, and so is a packed
    weight of another layout."""
    w, _ = layer(8, 576, seed=8, bias=False)
    assert fits(w, None)
    assert not fits(w.float(), None)
    assert not fits(layer(8, 48, seed=8, bias=False)[0], None)
    assert not fits(layer(576, 8, seed=8, bias=False)[0].t(), None)
    assert not fits(w, torch.zeros(7, dtype=torch.bfloat16))  # a bias of another length
    assert not fits(w, torch.zeros(8))  # a float32 bias
    with pytest.raises(ValueError, match="bfloat16"):
        pack(layer(8, 48, seed=8, bias=False)[0])
    with pytest.raises(ValueError, match="width"):  # inputs of another width than the weight's
        rows_linear(torch.zeros(1, 64, dtype=torch.bfloat16), w, pack(w))
    with pytest.raises(ValueError, match="layout"):  # a packed weight that is not this weight's
        rows_linear(torch.zeros(1, 576, dtype=torch.bfloat16), w, w)
    with pytest.raises(ValueError, match="on meta"):  # a packed weight off the CPU
        rows_linear(torch.zeros(3, 576, dtype=torch.bfloat16), w, torch.empty(2, 18, 4, 32, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(ValueError, match="no packed weight"):  # 3 rows read the packed blocks
        rows_linear(torch.zeros(3, 576, dtype=torch.bfloat16), w, None)
    assert torch.equal(rows_linear(torch.ones(2, 576, dtype=torch.bfloat16), w, None),
                       kernel(torch.ones(2, 576, dtype=torch.bfloat16), w, None))


def test_a_model_layer_the_kernel_does_not_fit_takes_the_gemms_in_the_generated_role(monkeypatch):
    """``Linear`` in the generated role: a bfloat16 layer that fits takes the kernel; a width off 32
    and a float32 layer take ``F.linear`` as in the prompt role, bit for bit."""
    from specinfer.model import Linear, transformer

    calls = []
    monkeypatch.setattr(transformer, "rows_linear", lambda *a: calls.append(1) or rows_linear(*a))
    g = torch.Generator().manual_seed(9)
    unfit = [(Linear(48, 8, bias=False).bfloat16(), torch.randn(3, 48, generator=g).bfloat16()),
             (Linear(64, 8), torch.randn(3, 64, generator=g))]
    for layer, x in unfit:
        assert torch.equal(layer(x, generated=True), layer(x))
    assert not calls
    fitting = Linear(64, 8).bfloat16()
    x = torch.randn(3, 64, generator=g).bfloat16()
    assert torch.equal(fitting(x, generated=True), kernel(x, fitting.weight, fitting.bias))
    assert calls == [1]


def test_a_layers_packed_copy_follows_its_weight():
    """``Linear.packed``: made on the first generated call of 3 rows or more, then reused while the weight stands; made again after the weight
    changed in place (``copy_``, as loading and offloading write, under inference mode too) or was
    replaced (``.data`` assigned, as sharding does), so the generated role always reads the weight's
    current values."""
    from specinfer.model import Linear

    g = torch.Generator().manual_seed(10)
    lin = Linear(64, 12).bfloat16()
    for rows in (1, 2):  # the row-major weight's tiles: no copy yet
        one = torch.randn(rows, 64, generator=g).bfloat16()
        assert torch.equal(lin(one, generated=True), kernel(one, lin.weight, lin.bias))
    assert "_packed" not in lin.__dict__
    x = torch.randn(3, 64, generator=g).bfloat16()  # 3 rows: the packed blocks
    assert torch.equal(lin(x, generated=True), kernel(x, lin.weight, lin.bias))
    first = lin.packed()
    assert lin.packed() is first
    assert torch.equal(lin(x, generated=True), kernel(x, lin.weight, lin.bias))
    with torch.no_grad():
        lin.weight.copy_(torch.randn(12, 64, generator=g).bfloat16())
    assert lin.packed() is not first
    assert torch.equal(lin(x, generated=True), kernel(x, lin.weight, lin.bias))
    second = lin.packed()
    with torch.inference_mode():
        lin.weight.mul_(2)
    assert lin.packed() is not second
    assert torch.equal(lin(x, generated=True), kernel(x, lin.weight, lin.bias))
    lin.weight.data = torch.randn(12, 64, generator=g).bfloat16()
    assert torch.equal(lin(x, generated=True), kernel(x, lin.weight, lin.bias))
    lin.weight.data = torch.randn(8, 64, generator=g).bfloat16()  # a shard: fewer rows
    lin.bias.data = lin.bias.data[:8]
    assert torch.equal(lin(x, generated=True), kernel(x, lin.weight, lin.bias))


def test_a_copied_layer_and_a_layer_made_under_inference_mode_read_their_own_weights():
    """A deep copy (offloading's buffers are made so) packs its own weight, and writing it leaves the
    original's results alone; weights made under ``torch.inference_mode`` count no writes, so their
    layer packs on every call of 3 rows or more (a warning says so) and sees every write."""
    import copy

    from specinfer.model import Linear

    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 64, generator=g).bfloat16()
    lin = Linear(64, 6).bfloat16()
    want = lin(x, generated=True)
    twin = copy.deepcopy(lin)
    with torch.no_grad():
        twin.weight.mul_(3)
    assert torch.equal(twin(x, generated=True), kernel(x, twin.weight, twin.bias))
    assert torch.equal(lin(x, generated=True), want)
    with torch.inference_mode():
        frozen = Linear(64, 6).bfloat16()
        assert frozen.weight.is_inference()
        with pytest.warns(UserWarning, match="inference_mode"):
            assert torch.equal(frozen(x, generated=True), kernel(x, frozen.weight, frozen.bias))
        frozen.weight.mul_(2)
        with pytest.warns(UserWarning, match="inference_mode"):
            assert torch.equal(frozen(x, generated=True), kernel(x, frozen.weight, frozen.bias))
