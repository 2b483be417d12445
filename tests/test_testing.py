"""The verification helpers must be able to fail: each check here feeds them a wrong answer."""

import pytest
import torch

from bigkern import memory, testing


def test_compare_passes_a_correct_result():
    ref = torch.randn(100, dtype=torch.float64)
    assert testing.compare(ref.float(), ref, ref.float()).ok


def test_compare_fails_a_wrong_result():
    ref = torch.randn(100, dtype=torch.float64)
    wrong = ref.float().clone()
    wrong[17] += 1e-3
    assert not testing.compare(wrong, ref, ref.float()).ok


def test_compare_scales_with_torch_error():
    ref = torch.randn(100, dtype=torch.float64)
    noise = 1e-6 * torch.randn(100, dtype=torch.float64)
    torch_result = ref + noise
    assert testing.compare(ref + 1.9 * noise, ref, torch_result).ok
    assert not testing.compare(ref + 2.1 * noise, ref, torch_result).ok
    assert testing.compare(ref + 2.9 * noise, ref, torch_result, factor=3.0).ok


def test_compare_fails_unwritten_nan_and_misplaced_nan():
    ref = torch.randn(10, dtype=torch.float64)
    poisoned = ref.float().clone()
    poisoned[3] = float("nan")
    result = testing.compare(poisoned, ref, ref.float())
    assert not result.ok and "non-finite" in result.detail
    ref[4] = float("nan")
    result = testing.compare(ref.float().nan_to_num(0.0), ref, ref.float())
    assert not result.ok and "NaN" in result.detail


def test_compare_accepts_torchs_own_non_finite_values_only():
    """Where torch's same-dtype result departs from the math (NaN where the reference is +inf), the
    same NaN passes as torch's behavior; a NaN torch does not give still fails."""
    ref = torch.randn(10, dtype=torch.float64)
    ref[2] = float("inf")
    torch_result = ref.float().clone()
    torch_result[2] = float("nan")
    assert testing.compare(torch_result, ref, torch_result).ok
    assert testing.compare(ref.float(), ref, torch_result).ok
    stray = torch_result.clone()
    stray[5] = float("nan")
    result = testing.compare(stray, ref, torch_result)
    assert not result.ok and "non-finite" in result.detail


def test_compare_fails_wrong_shape():
    ref = torch.randn(4, 5, dtype=torch.float64)
    assert not testing.compare(ref.float().t(), ref, ref.float()).ok


def test_poisoned_outputs_fill_with_nan():
    with memory.poisoned_outputs(True):
        assert memory.empty((5,), dtype=torch.float32, device="cpu").isnan().all()
        assert (memory.empty((5,), dtype=torch.int32, device="cpu") == torch.iinfo(torch.int32).max).all()


def test_guard_bands_catch_out_of_bounds_writes():
    with memory.poisoned_outputs(True):
        memory.check_guards()
        y = memory.empty_like(torch.randn(4, 5).t())
        assert y.stride() == (1, 5) and y.isnan().all()
        y.fill_(3.0)  # every element in bounds: fine
        memory.check_guards()
        y = memory.empty_like(torch.randn(4, 5).t())
        y.as_strided((21,), (1,), y.storage_offset())[-1] = 1.0  # one element past the end
        with pytest.raises(AssertionError, match="out of bounds"):
            memory.check_guards()
        z = memory.empty((3,), dtype=torch.float16, device="cpu")
        z.as_strided((1,), (1,), z.storage_offset() - 1)[0] = 2.0  # one element before the start
        with pytest.raises(AssertionError, match="out of bounds"):
            memory.check_guards()


def test_poisoned_outputs_are_not_views():
    """Ops' outputs may be modified in place (a ReLU(inplace=True) after a conv) as torch's may; an
    output that were a view of its guarded buffer would make autograd refuse that under test only."""
    import bigkern
    from bigkern.nn import functional as F

    with memory.poisoned_outputs(True):
        assert memory.empty((3, 4), dtype=torch.float32, device="cpu")._base is None
        x = torch.randn(3, 4, requires_grad=True)
        with bigkern.use_backend("torch"):
            y = F.bias_act(x, torch.randn(4), "gelu")
        y.mul_(2)
        y.sum().backward()
        assert x.grad.isfinite().all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "strided"])
def test_make_tensor_layouts_are_random_and_as_asked(layout):
    t = testing.make_tensor((2, 3, 5, 7), layout=layout)
    assert t.shape == (2, 3, 5, 7) and t.std() > 0.5 and (t != 0).all()
    assert memory.is_dense(t) == (layout != "strided")
    if layout == "channels_last":
        assert t.is_contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        assert not t.is_contiguous()


def test_is_dense():
    x = torch.randn(4, 6, 5)
    assert memory.is_dense(x) and memory.is_dense(x.transpose(0, 2)) and memory.is_dense(x[:1])
    assert not memory.is_dense(x[:, ::2]) and not memory.is_dense(x[:, :3]) and not memory.is_dense(x[:, :1])
    assert memory.is_dense(torch.randn(3, 1, 4)[:, :, :].expand(3, 1, 4))
    assert not memory.is_dense(torch.randn(3, 1).expand(3, 4))


def test_compare_floor_is_a_few_ulps_of_the_largest_reference():
    """A floor of 64 ulps, or one scaled by the sum of |reference| instead of its largest element,
    still rejected the 1e-3 error of the test above: 16 ulps (fp32) and 4 ulps (fp16) must fail."""
    ref = torch.randn(10_000, dtype=torch.float64)
    wrong = ref.float()
    wrong[7] += 16 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    assert not testing.compare(wrong, ref, ref.float()).ok
    half = torch.randn(100, dtype=torch.float64)
    wrong16 = half.half()
    wrong16[3] += 4 * torch.finfo(torch.float16).eps * half.abs().max().item()
    assert not testing.compare(wrong16, half, half.half()).ok


def test_compare_fails_a_lost_or_flipped_negative_infinity():
    ref = torch.randn(10, dtype=torch.float64)
    ref[4] = float("-inf")
    for bad in (float("inf"), 0.0):
        actual = ref.float()
        actual[4] = bad
        assert not testing.compare(actual, ref, ref.float()).ok, bad


def test_compare_fails_a_result_in_another_dtype_than_torchs():
    """A kernel returning float32 for float16 inputs passed: the dtype was never compared."""
    ref = torch.randn(10, dtype=torch.float64)
    result = testing.compare(ref.float(), ref, ref.half())
    assert not result.ok and "dtype" in result.detail


def test_compare_fails_a_torch_result_of_another_shape():
    """torch's result broadcast silently into the error bound (a (1, 3) one inflated it)."""
    ref = torch.randn(4, 3, dtype=torch.float64)
    result = testing.compare(ref.float() + 1.0, ref, torch.zeros(1, 3))
    assert not result.ok and "torch's result: shape" in result.detail


def test_compare_holds_each_element_where_the_reference_or_torch_is_not_finite():
    """Where the reference was NaN/Inf but torch finite, any value passed; where torch overflowed
    (fp16 past 65504) but the reference is finite, any non-finite value passed."""
    ref = torch.randn(10, dtype=torch.float64)
    ref[2] = float("nan")
    torch_result = ref.float().clone()
    torch_result[2] = 0.0  # torch departs from the math here: its value is the one to match
    near, far = torch_result.clone(), torch_result.clone()
    far[2] = 1e30
    assert testing.compare(near, ref, torch_result).ok
    assert not testing.compare(far, ref, torch_result).ok
    big = torch.randn(10, dtype=torch.float64)
    big[3] = 7e4
    overflowed = big.half()  # +inf at 3
    assert testing.compare(overflowed, big, overflowed).ok
    flipped = overflowed.clone()
    flipped[3] = float("-inf")
    result = testing.compare(flipped, big, overflowed)
    assert not result.ok and "non-finite" in result.detail


def test_compare_fails_an_infinity_where_reference_and_torch_are_finite():
    ref = torch.randn(10, dtype=torch.float64)
    for bad in (float("inf"), float("-inf")):
        actual = ref.float()
        actual[6] = bad
        result = testing.compare(actual, ref, ref.float())
        assert not result.ok and "non-finite" in result.detail, bad


def test_compare_floor_is_half_an_ulp_for_16_bit_types_and_four_for_fp32():
    """Against a reference the dtype holds exactly (torch's error 0), twice the floor fails: one ulp
    of the largest value past half an ulp (bf16 in the interpreter: two past one), eight past four."""
    assert testing.default_floor_ulps(torch.float16) == 0.5 and testing.default_floor_ulps(torch.float32) == 4.0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ulps = 2 * testing.default_floor_ulps(dtype)
        ref = torch.tensor([1.0, -0.5, 0.25, 0.75], dtype=torch.float64)
        wrong = ref.to(dtype)
        wrong[0] += ulps * torch.finfo(dtype).eps
        assert not testing.compare(wrong, ref, ref.to(dtype)).ok, dtype
        assert testing.compare(ref.to(dtype), ref, ref.to(dtype)).ok
        assert testing.compare(wrong, ref, ref.to(dtype), floor_ulps=ulps).ok, dtype


def test_factors_are_flashattentions():
    assert (testing.OUTPUT_FACTOR, testing.GRADIENT_FACTOR) == (2.0, 3.0)


def test_assert_gradients_close_fails_a_missing_extra_or_wrong_gradient():
    ref = [torch.randn(5, dtype=torch.float64), None]
    good = [ref[0].float(), None]
    testing.assert_gradients_close(good, ref, good, ["a", "b"])
    wrong = [ref[0].float() + 1e-2, None]
    for actual in (wrong, [None, None], [ref[0].float(), torch.ones(1)]):
        with pytest.raises(AssertionError):
            testing.assert_gradients_close(actual, ref, good, ["a", "b"])
