"""`archipelago bench codec`'s measurement on a small delta: every field, both zstd settings."""

from __future__ import annotations

import pytest
import torch

from protos import quant
from protos.quant import SCHEMES
from sim.bench_codec import measure


def test_measure_reports_every_scheme_with_and_without_zstd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(quant.COMPILE_ENV, "0")
    g = torch.Generator().manual_seed(0)
    delta = {"w": torch.randn(40, 64, generator=g) * 1e-3, "b": torch.randn(40, generator=g) * 1e-3}
    result = measure(delta, repeats=2)
    assert result["params"] == 40 * 64 + 40 and result["compile_mode"] == "0"
    assert set(result["schemes"]) == set(SCHEMES)
    for name, s in result["schemes"].items():
        for key in ("encode_MBps", "encode_ef_MBps", "encode_no_ef_MBps", "decode_MBps", "memcpy_MBps",
                    "encode_vs_memcpy", "decode_vs_memcpy", "rel_error", "first_encode_s", "first_decode_s"):
            assert s[key] >= 0, (name, key)
        assert s["encode_vs_memcpy"] == pytest.approx(s["encode_MBps"] / s["memcpy_MBps"])
        default = s["bits_per_param_zstd"] if s["zstd"] else s["bits_per_param_no_zstd"]
        assert s["bits_per_param"] == default and s["compression_vs_fp32"] == pytest.approx(32 / default)
        assert s["bits_per_param_no_zstd"] > 0 and s["bits_per_param_zstd"] > 0
        assert (name == "fp32") == (s["rel_error"] == 0.0)
        for k in s["kernels"].values():  # "ready" too if an earlier test in this process compiled them
            assert k["state"] in ("eager", "never", "ready", "failed") and set(k) == {"state", "compile_s", "error"}
