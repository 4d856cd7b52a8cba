"""The torch.library registrations (sparsekern/ops/library.py): opcheck on every op and backend
available here, and the fused statistics update (one call per batch) against the pure-torch
reference, exactly (maxima, counts, ranges, histograms and two-pass counts are all exact)."""
import pytest
import torch

import sparsekern  # noqa: F401  (registers torch.ops.sparsekern.*)
from sparsekern import _backend
from sparsekern.ops.channel_stats_update import HOST_FIELDS, channel_stats_update_reference
from sparsekern.stats.stores.histogram import num_buckets

from _helpers import kind_params, prepare_kind

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _state(c, device, bits=3, two_pass=False, reference=None, thresholds=(1e-3, 0.5)):
    z = lambda dtype: torch.zeros(c, dtype=dtype, device=device)  # noqa: E731
    state = {
        "mx": z(torch.float32), "nan_samples": z(torch.int64), "inf_samples": z(torch.int64),
        "pos": z(torch.int64), "value_min": torch.full((c,), float("inf"), device=device),
        "value_max": torch.full((c,), float("-inf"), device=device),
        "host": torch.zeros(len(HOST_FIELDS), dtype=torch.int64),
        "histogram": torch.zeros(c, num_buckets(bits), dtype=torch.int64, device=device),
        "reference": None, "thresholds": None, "pass2_counts": None, "pass2_max": None, "pass2_samples": None,
    }
    if two_pass:
        state.update(reference=reference.to(device), thresholds=torch.tensor(thresholds, dtype=torch.float64,
                                                                            device=device),
                     pass2_counts=torch.zeros(c, len(thresholds), dtype=torch.int64, device=device),
                     pass2_max=z(torch.float32), pass2_samples=torch.zeros((), dtype=torch.int64))
    return state


def _op_args(x, s, bits=3, enabled=None, keep=False, backend="auto"):
    return (x, s["mx"], s["nan_samples"], s["inf_samples"], s["pos"], s["value_min"], s["value_max"], s["host"],
            s["histogram"], bits, s["reference"], s["thresholds"], s["pass2_counts"], s["pass2_max"],
            s["pass2_samples"], enabled, keep, backend)


def _backends_here():
    out = ["torch"]
    if _backend.backend_supports("cpp", torch.device("cpu"))[0]:
        out.append("cpp")
    return out


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("count_positive", [False, True])
def test_opcheck_channel_absmax_and_extrema(backend, count_positive):
    for x in (torch.randn(3, 5, 4, 7), torch.randn(2, 6, 5, 5).to(memory_format=torch.channels_last),
              torch.randn(4, 3), torch.randn(2, 3, 9, dtype=torch.float16)):
        for op in (torch.ops.sparsekern.channel_absmax.default, torch.ops.sparsekern.channel_extrema.default):
            torch.library.opcheck(op, (x, count_positive, backend), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("keep", [False, True])
def test_opcheck_stats_update(backend, keep):
    x = torch.randn(3, 5, 4, 7)
    ref = channel_stats_update_reference(x, **{k: v for k, v in _state(5, "cpu").items()
                                              if k not in ("reference", "thresholds", "pass2_counts", "pass2_max",
                                                           "pass2_samples")}, keep_maxima=True)
    for two_pass in (False, True):
        s = _state(5, "cpu", two_pass=two_pass, reference=ref.amax(dim=0))
        torch.library.opcheck(torch.ops.sparsekern.channel_stats_update_.default,
                              _op_args(x, s, keep=keep, backend=backend), test_utils=OPCHECK_TESTS)
    s = _state(5, "cpu")
    torch.library.opcheck(torch.ops.sparsekern.channel_stats_update_.default,
                          _op_args(x, s, enabled=torch.tensor(False), keep=keep, backend=backend),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_opcheck_cuda(backend):
    if not _backend.backend_supports(backend, torch.device("cuda"))[0]:
        pytest.skip(f"{backend} unavailable")
    x = torch.randn(3, 5, 4, 7, device="cuda")
    for op in (torch.ops.sparsekern.channel_absmax.default, torch.ops.sparsekern.channel_extrema.default):
        torch.library.opcheck(op, (x, True, backend), test_utils=OPCHECK_TESTS)
    s = _state(5, "cuda")
    torch.library.opcheck(torch.ops.sparsekern.channel_stats_update_.default, _op_args(x, s, backend=backend),
                          test_utils=OPCHECK_TESTS)


def _inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    relu = lambda t: torch.relu(t)  # noqa: E731
    nan = relu(r(5, 7, 3, 3))
    nan[1, 2, 0, 1] = float("nan")
    nan[3, 0, 2, 2] = float("inf")
    nan[4, 6] = 0.0  # an all-zero (n, c)
    nan[0, 5, 1, 1] = -0.0
    return {
        "nchw": relu(r(6, 8, 5, 5)),
        "channels_last": relu(r(6, 8, 5, 5)).to(memory_format=torch.channels_last),
        "odd": r(7, 3, 1, 97),  # signed values: the range and counts see negatives
        "nc": r(9, 13),
        "ncl": r(3, 17, 11),
        "strided": r(4, 10, 6, 6)[:, ::2, 1:, ::2],
        "nan_inf": nan,
        "empty_positions": r(3, 4, 0),
        "big_c": relu(r(2, 1023, 1, 2)),
    }


def _run_update(x, backend, device, two_pass, keep=False, bits=3, steps=2):
    ref_m = channel_stats_update_reference(x, **{k: v for k, v in _state(x.shape[1], device, bits).items()
                                                if k in ("mx", "nan_samples", "inf_samples", "pos", "value_min",
                                                         "value_max", "host")}, keep_maxima=True)
    reference = torch.where(torch.isnan(ref_m), 0, ref_m).amax(dim=0).clamp(min=1e-30) if x.numel() else None
    s = _state(x.shape[1], device, bits, two_pass and reference is not None, reference)
    outs = []
    for _ in range(steps):  # twice: the accumulators start from non-identity values the second time
        if backend == "reference":
            outs.append(channel_stats_update_reference(x, **s, hist_bits=bits, keep_maxima=keep))
        else:
            outs.append(torch.ops.sparsekern.channel_stats_update_(*_op_args(x, s, bits, keep=keep, backend=backend)))
    return s, outs


def _assert_same_state(got, want, name):
    for key, value in want.items():
        if value is None:
            assert got[key] is None
            continue
        assert torch.equal(got[key].cpu(), value.cpu()), f"{name}: {key}"


@pytest.mark.parametrize("kind", kind_params())
@pytest.mark.parametrize("two_pass", [False, True])
def test_stats_update_equals_reference(kind, two_pass):
    backend, device = prepare_kind(kind)
    for name, x in _inputs(device).items():
        want, want_m = _run_update(x.cpu(), "reference", "cpu", two_pass, keep=True)
        got, got_m = _run_update(x, backend, device, two_pass, keep=True)
        _assert_same_state(got, want, name)
        torch.testing.assert_close(got_m[0].cpu(), want_m[0], rtol=0, atol=0, equal_nan=True, msg=name)
        got2, got2_m = _run_update(x, backend, device, two_pass, keep=False)
        _assert_same_state(got2, want, name)
        assert got2_m[0].numel() == 0


@pytest.mark.parametrize("kind", kind_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stats_update_low_precision(kind, dtype):
    backend, device = prepare_kind(kind)
    if backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("the Triton interpreter has no bf16 math")
    for bits in (0, 3, 7):
        for name in ("nchw", "channels_last", "nan_inf"):
            x = _inputs(device, dtype)[name]
            want, _ = _run_update(x.cpu(), "reference", "cpu", True, bits=bits)
            got, _ = _run_update(x, backend, device, True, bits=bits)
            _assert_same_state(got, want, f"{name} bits={bits}")


def test_disabled_update_changes_nothing():
    x = torch.rand(4, 3, 5, 5)
    for backend in _backends_here():
        s = _state(3, "cpu")
        before = {k: v.clone() for k, v in s.items() if v is not None}
        torch.ops.sparsekern.channel_stats_update_(*_op_args(x, s, enabled=torch.tensor(False), backend=backend))
        for k, v in before.items():
            assert torch.equal(s[k], v), k
        torch.ops.sparsekern.channel_stats_update_(*_op_args(x, s, enabled=torch.tensor(True), backend=backend))
        assert s["host"].tolist() == [4, 100, 4, 4]


def test_stats_update_rejects_bad_state():
    x = torch.rand(4, 3, 5, 5)
    s = _state(3, "cpu")
    s["mx"] = torch.zeros(4)
    with pytest.raises(ValueError, match="max must be"):
        torch.ops.sparsekern.channel_stats_update_(*_op_args(x, s))
    s = _state(3, "cpu")
    s["host"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="host"):
        torch.ops.sparsekern.channel_stats_update_(*_op_args(x, s))


def test_explicit_unavailable_backend_raises_inside_the_op():
    if _backend.backend_supports("cuda", torch.device("cpu"))[0]:
        pytest.skip("cuda runs CPU tensors?")
    with pytest.raises(sparsekern.BackendUnavailableError):
        sparsekern.channel_absmax(torch.rand(2, 3, 4), backend="cuda")


def test_cpp_update_is_one_fused_call(monkeypatch):
    """With _C built, the cpp backend runs the fused entry point, never the two-step fallback."""
    ext = _backend.extension()
    if ext is None:
        pytest.skip("sparsekern._C is not built")
    assert hasattr(ext, "channel_stats_cpu")
    import sparsekern.ops.channel_stats_update as update

    def fail(*args, **kwargs):
        raise AssertionError("two-step path taken")

    monkeypatch.setattr(update, "accumulate_reference", fail)
    s = _state(3, "cpu")
    torch.ops.sparsekern.channel_stats_update_(*_op_args(torch.rand(4, 3, 5, 5), s, backend="cpp"))
    assert s["host"].tolist() == [4, 100, 4, 4]
