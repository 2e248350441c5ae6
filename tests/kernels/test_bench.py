"""The benchmark runs, and on CPU it sees the fused path's memory saving."""

import pytest

from kernels import bench


def test_fused_peak_memory_is_a_fraction_of_naive():
    # 512 x 32000 fp32 logits are 62.5 MiB; the naive path holds several such tensors at once
    shape = {"tokens": 512, "hidden_size": 32, "vocab": 32000, "dtype": bench.DTYPES["fp32"],
             "device": "cpu", "repeat": 1}
    naive = bench.measure(impl="reference", **shape)
    fused = bench.measure(impl="chunked", **shape)
    assert naive["peak_mib"] > 2 * 62.5, naive
    assert fused["peak_mib"] < naive["peak_mib"] / 2, (fused, naive)
    assert fused["median_ms"] > 0 and len(fused["times_ms"]) == 1


def test_cli_prints_a_table(capsys):
    results = bench.main(["--tokens", "16", "--hidden", "8", "--vocab", "100", "--impl", "chunked",
                          "--repeat", "1", "--entropy"])
    assert [r["impl"] for r in results] == ["chunked"]
    assert "chunked" in capsys.readouterr().out


def test_cli_rejects_unknown_impl():
    with pytest.raises(SystemExit):
        bench.parse_args(["--impl", "chunked,fast"])
