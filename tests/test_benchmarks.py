"""The benchmarks that can run at test size do, and their last line is the JSON they promise."""
import pytest

pytestmark = pytest.mark.integration


def test_pool_scale_measures_a_round_of_the_driver(ray_local, tmp_path, capsys):
    from benchmarks.pool_scale import main

    result = main(["--rows", "300", "--labeled", "20", "--select", "5", "--batch-size", "16", "--work-dir", str(tmp_path)])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"benchmark": "pool_scale"')
    assert [c["call"] for c in result["calls"]] == ["base", "lora"] and [c["rows"] for c in result["calls"]] == [300, 280]
    assert result["driver_peak_rss_mb"] >= result["driver_rss_before_load_mb"] > 0
    assert result["driver_cpu_s_per_million"] > 0 and result["rows_per_s"] > 0
