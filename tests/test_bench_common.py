"""The benchmarks' own arithmetic (the numbers they print are only as good as it)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import idle_gaps  # noqa: E402


def test_idle_gaps_merge_overlapping_kernels_and_name_the_longest_waits():
    # µs: a and b overlap (busy 0-10), c 12-20, then a 20 µs wait before the optimizer's kernel, d right after it
    kernels = [(12, 20, "c"), (0, 10, "a"), (5, 8, "b"), (40, 45, "optimizer"), (45, 50, "d")]
    idle_ms, gaps = idle_gaps(kernels, top=1)
    assert idle_ms == (2 + 20) / 1000
    assert gaps == [{"ms": 0.02, "after": "c", "before": "optimizer"}]
    assert idle_gaps([]) == (0.0, [])


def test_optimizer_benchmark_reports_each_form_and_whether_flat_equals_per_tensor(tmp_path, capsys):
    import json

    import pytest

    pytest.importorskip("bitsandbytes")
    import bench_optimizer

    bench_optimizer.main(["--shape", "tiny", "--text_encoders", "--warmup", "1", "--steps", "2",
                          "--json", str(tmp_path / "r.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["optimizer"] for r in rows] == ["bnb_per_tensor", "ours_flat_8bit", "torch_fused_adamw",
                                             "prodigy_per_tensor", "ours_flat_prodigy"]
    assert rows[0]["tensors"] == rows[1]["tensors"] > 0 and rows[0]["groups"] == 2
    assert rows[1]["max_abs_diff_vs_per_tensor"] == 0.0 and all(r["ms_per_step"] > 0 for r in rows)
