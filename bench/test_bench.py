"""The benchmark cases under pytest-benchmark:

    pytest bench/ --benchmark-enable [-k attention] [--benchmark-compare] [--benchmark-histogram]

One benchmark per (case, provider) of `bigkern bench --quick`, each provider built from the same
seed as the others and each bigkern result checked against the case's reference first, as
`bigkern bench` does (harness.first_call, harness.check). pytest-benchmark times with the wall
clock, so on a GPU each call is synchronized; the stored figures, the ceilings and the README's
tables come from `bigkern bench` (CUDA events, L2 flushed between calls), this is for comparing
runs with pytest-benchmark's own tools. Without a GPU the cases are tiny and run on the CPU (Triton
in its interpreter): that checks the wiring, not the speed. (The repository's pytest settings
disable benchmarks: with them disabled each provider runs once, as a test.)
"""

import pytest
import torch

from bigkern import benchmark
from bigkern.benchmark import harness

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16] if ON_GPU else [torch.float32]
FAMILIES = ("epilogue", "attention", "conv", "lstm")
# without a GPU: one small shape per family (the benchmark's own are minutes each in the interpreter)
CPU_SHAPES = {
    "epilogue": {"cases": [dict(shape=[2, 4, 3, 3], dim=1, layout="channels_last", activation="gelu", quick=True)]},
    "attention": {"sweep": [dict(batch=1, heads=2, seq=33, head_dim=16, causal=True, quick=True)]},
    "conv": {"batches": [2], "other": [], "resnet50": [
        dict(name="l", in_channels=3, out_channels=4, kernel=3, stride=1, padding=1, in_hw=5, residual=True,
             quick=True)]},
    "lstm": {"inference": [dict(hidden=8, batch=2, steps=3, input=5, quick=True)],
             "training": [dict(hidden=8, batch=2, steps=3, input=5, quick=True)]},
}


def _cases():
    import importlib

    shapes = benchmark.load_shapes() if ON_GPU else CPU_SHAPES
    for family in FAMILIES:
        yield from importlib.import_module(benchmark.SUITES[family]).cases(shapes, DEVICE, DTYPES, quick=True)


CASES = list(_cases())
PARAMS = [pytest.param(case, provider, id=f"{case.family}-{case.name}-{str(case.dtype)[6:]}-{case.mode}-{provider}"
                       .replace(" ", "_")) for case in CASES for provider in case.providers]
_references = {}  # id(case) -> (name, result) of the first of its references that runs, or None


def _reference(case):
    if id(case) not in _references:
        _references.clear()  # the parameters come case by case: hold one case's reference at a time
        _references[id(case)] = harness.reference_result(case)
    return _references[id(case)]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_provider(benchmark, case, provider):
    try:
        fn, result = harness.first_call(case.providers[provider])
    except harness.Unavailable as reason:
        pytest.skip(str(reason))
    benchmark.extra_info.update(family=case.family, case=case.name, mode=case.mode, flops=case.flops,
                                bytes=case.bytes, params=case.params)
    if case.references and provider.startswith("bigkern-"):
        checked, wrong = harness.check(case, result, _reference(case))
        benchmark.extra_info["check"] = checked
        assert wrong is None, f"{provider}: {wrong}"
    del result
    if ON_GPU:
        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(fn)
