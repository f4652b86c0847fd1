"""The C scan's build: cached per source and machine, atomic, and a fallback where it cannot build.

Its numbers are checked against the sequential reference in test_scan.py, with the torch scan.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from scan_reference import make_inputs, reference_scan, rel_err

from cmdbnet.models import scan, vss
from cmdbnet.models.scan import build, dispatch, native, selective_scan


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A private kernel cache and no memory of earlier builds; the process's library afterwards."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(scan.BACKEND_ENV, raising=False)
    native._load.cache_clear()
    dispatch._native_or_torch.cache_clear()
    yield tmp_path / "cache" / "kernels"
    native._load.cache_clear()
    dispatch._native_or_torch.cache_clear()


def _small():
    return make_inputs(2, 8, 23, 1, "g2", D=True, bias=True, seed=5)


def test_builds_once_into_the_cache_and_reuses_it(fresh_build):
    lib = native.library()
    assert lib is not None and native.library_error() == ""
    built, record = sorted(fresh_build.iterdir())  # no temporary file left beside them
    assert record.name == built.name + ".json"
    assert built.name.startswith("scan-") and built.suffix == ".so" and native.library_path() == str(built)
    stamp = built.stat().st_mtime_ns
    native._load.cache_clear()
    assert native.library_path() == str(built) and built.stat().st_mtime_ns == stamp  # not rebuilt
    kw = _small()
    assert rel_err(selective_scan(**kw, delta_softplus=True), reference_scan(**kw, delta_softplus=True)) <= 1e-5


def test_without_a_compiler_auto_falls_back_to_torch_with_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    assert native.library() is None and "no-such-cc" in native.library_error()
    assert "native" not in scan.available_backends() and scan.backend_status()["native"]
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert scan.resolve_backend("cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert scan.resolve_backend("cpu") == "torch"
        kw = _small()
        assert rel_err(selective_scan(**kw), reference_scan(**kw)) <= 1e-5
    monkeypatch.setenv(scan.BACKEND_ENV, "native")
    with pytest.raises(scan.ScanBackendError, match="no-such-cc"):
        selective_scan(**_small())
    assert not fresh_build.exists() or not any(fresh_build.iterdir())


def test_a_failing_compiler_leaves_nothing_in_the_cache(fresh_build, monkeypatch, tmp_path):
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\nfor a; do case $a in *.part) : > \"$a\";; esac; done\n"
                  "echo 'internal compiler error' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    assert native.library() is None
    assert "failed to compile" in native.library_error() and "internal compiler error" in native.library_error()
    assert list(fresh_build.iterdir()) == []


def test_forced_native_refuses_cuda_tensors(monkeypatch):
    monkeypatch.setenv(scan.BACKEND_ENV, "native")
    with pytest.raises(scan.ScanBackendError, match="needs CPU tensors"):
        scan.resolve_backend("cuda")


def test_fp64_goes_to_the_torch_scan_and_nan_propagates(monkeypatch):
    monkeypatch.delenv(scan.BACKEND_ENV, raising=False)
    kw = make_inputs(1, 4, 9, 1, "g1", D=True, bias=True, dtype=torch.float64)
    out = selective_scan(**kw, delta_softplus=True)
    assert out.dtype == torch.float64 and rel_err(out, reference_scan(**kw, delta_softplus=True)) <= 1e-12
    kw = _small()
    with torch.no_grad():
        kw["u"][1, 3, 7] = float("nan")
    out = selective_scan(**kw, delta_softplus=True)
    assert out[1, 3, 7:].isnan().all() and out[1, 3, :7].isfinite().all() and out[0].isfinite().all()


def test_extreme_decays_match_the_reference(monkeypatch):
    """exp underflowing to 0 (long steps, large |A|) and softplus far past its threshold."""
    monkeypatch.setenv(scan.BACKEND_ENV, "native")
    kw = make_inputs(2, 4, 40, 2, "g2", D=True, bias=True, seed=9)
    with torch.no_grad():
        kw["delta"][0, :, ::3] = 60.0
        kw["A"][0] = -30.0
    for mode in (False, True):
        ours = selective_scan(**kw, delta_softplus=mode)
        ref = reference_scan(**kw, delta_softplus=mode)
        assert ours.isfinite().all() and rel_err(ours, ref) <= 1e-5
        for name, a, r in zip(kw, torch.autograd.grad(ours.sum(), list(kw.values())),
                              torch.autograd.grad(ref.sum(), list(kw.values()))):
            assert rel_err(a, r) <= 1e-5, name


def test_build_is_keyed_by_source_and_cpu(fresh_build, monkeypatch):
    first = native.library_path()
    native._load.cache_clear()
    monkeypatch.setattr(build, "_cpu_signature", lambda: "flags: another-cpu")
    second = native.library_path()
    assert second != first and sorted(os.listdir(fresh_build)) == sorted(
        os.path.basename(p) + ext for p in (first, second) for ext in ("", ".json"))


def test_an_unwritable_cache_builds_in_a_temporary_folder(fresh_build, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(native.CACHE_ENV, str(blocker))  # its kernels/ cannot be created
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert native.library() is not None
    assert native.library_path().startswith(str(tmp_path / "tmp" / "cmdbnet-kernels-"))


def _ss2d_run(block: vss.SS2D, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = block(x)
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad for p in block.parameters()]


# (d_model, d_state, expand, gate, h, w): one block of lanes and several with a partial one,
# kept states (d_state <= 2) and recomputed ones, the v0 gate, a one-row and a one-column plane.
_PLANES = [(64, 1, 0.5, False, 8, 8), (40, 2, 1.0, False, 5, 7), (48, 16, 1.0, True, 6, 3),
           (24, 1, 1.0, False, 1, 9), (80, 1, 1.0, False, 7, 1)]


@pytest.mark.parametrize(("d_model", "d_state", "expand", "gate", "h", "w"), _PLANES)
def test_plane_scan_equals_the_four_copies(monkeypatch, d_model, d_state, expand, gate, h, w):
    """SS2D's position-major C scan against the cross-scan, torch scan and merge it replaces:
    the output and every gradient, with decays, skips and biases away from their init."""
    torch.manual_seed(0)
    block = vss.SS2D(d_model, d_state=d_state, expand=expand, gate=gate)
    with torch.no_grad():
        block.A_logs.add_(0.3 * torch.randn_like(block.A_logs))
        block.Ds.add_(0.5 * torch.randn_like(block.Ds))
        block.dt_projs_bias.add_(torch.randn_like(block.dt_projs_bias))
    x, g = torch.randn(2, h, w, d_model), torch.randn(2, h, w, d_model)
    calls = []
    monkeypatch.setattr(native.PlaneScan, "apply", lambda *a, f=native.PlaneScan.apply: calls.append(1) or f(*a))
    monkeypatch.setenv(scan.BACKEND_ENV, "torch")
    expected = _ss2d_run(block, x, g)
    assert not calls
    monkeypatch.setenv(scan.BACKEND_ENV, "native")
    got = _ss2d_run(block, x, g)
    assert len(calls) == 1
    for a, e in zip(got, expected):
        assert rel_err(a, e) < 2e-5
    with torch.no_grad():  # nothing kept for a backward that will not come
        assert rel_err(block(x), expected[0]) < 2e-5


def _gomp_libraries() -> set[str]:
    return {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mapped libraries")
def test_the_library_runs_on_torchs_own_openmp_runtime():
    """Built with OpenMP, it must bind to the libgomp torch loaded, not bring a second runtime
    whose threads would fight torch's (still spinning) ones for the cores."""
    before = _gomp_libraries()
    lib = native.library()
    if not before:
        pytest.skip("this torch does not use libgomp")
    assert lib.openmp and _gomp_libraries() == before


def test_a_compiler_without_openmp_builds_a_serial_library(fresh_build, monkeypatch, tmp_path):
    """Apple's clang knows no -fopenmp: the next set of flags builds, and Python threads split the work."""
    cc = tmp_path / "cc-without-openmp"
    cc.write_text('#!/bin/sh\nfor a; do [ "$a" = -fopenmp ] && { echo "unsupported option" >&2; exit 1; }; done\n'
                  f'exec {build.compiler()[0]} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    assert native.library() is not None and not native.library().openmp
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the Python pool's path, even on a one-core machine
    try:
        torch.manual_seed(0)
        block = vss.SS2D(40, expand=1.0)
        x, g = torch.randn(2, 5, 6, 40), torch.randn(2, 5, 6, 40)
        got = _ss2d_run(block, x, g)
        monkeypatch.setenv(scan.BACKEND_ENV, "torch")
        expected = _ss2d_run(block, x, g)
    finally:
        torch.set_num_threads(threads)
    assert all(rel_err(a, e) < 2e-5 for a, e in zip(got, expected))
