"""Smoke tests of the benchmark harness (fastattn.bench): tiny shapes, --quick, no torch/ORT."""
import json

import numpy as np
import pytest

from fastattn import bench


def test_visible_pairs_count_only_visible_keys():
    L = 64
    assert bench.Case(1, 1, L, L, 8).pairs() == L * L
    assert bench.Case(1, 1, L, L, 8, causal=True).pairs() == L * (L + 1) // 2
    # window (w, 0): row i sees min(i, w) + 1 keys
    w = 5
    assert bench.Case(2, 3, L, L, 8, window=(w, 0)).pairs() == \
        2 * 3 * sum(min(i, w) + 1 for i in range(L))
    # bottom-right alignment: a single query row sees the whole cache
    dec = bench.Case(1, 4, 1, 100, 8, 16, Hkv=2, causal=True)
    assert dec.pairs() == 4 * 100
    assert dec.flops() == 2 * (8 + 16) * 400
    assert dec.kv_bytes() == 2 * 100 * (8 + 16) * 4        # each KV row once per KV head


def test_parse_shape_and_errors():
    assert bench.parse_shape("2,8,1,64,32,16,2") == dict(B=2, Hq=8, Lq=1, Lk=64, D=32, Dv=16,
                                                         Hkv=2)
    with pytest.raises(Exception):
        bench.parse_shape("1,2,3")
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "1,1,4,4,8", "--peers", "nosuchpeer", "--json", ""])


@pytest.mark.parametrize("argv", [["--shapes", "1,3,4,4,8,8,2"], ["--shapes", "1,2,4,4,8,8,4"],
                                  ["--threads", "5000"], ["--settle", "-1"],
                                  ["--json", "/proc/no/such/dir/x.json"], ["--json", "/"],
                                  ["--markdown", "/proc/no/such/dir/x.md"]])
def test_bad_options_stop_with_a_usage_error_before_any_run(argv, capsys):
    """an option the run cannot use (GQA heads that do not divide, a thread count above the
    limit, a negative sleep, an output path that cannot be written) stops at once with
    argparse's usage error, not with a traceback after the measurements"""
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick"] + argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_default_suite_covers_target_rows():
    rows = {c.target for c in bench.suite()}
    assert set("abcdef") <= rows
    decode = [c for c in bench.suite() if c.target == "d"]
    assert all(c.decode for c in decode) and any(c.Hkv != c.Hq for c in decode)


def test_quick_run_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "r.json"
    md = tmp_path / "R.md"
    rc = bench.main(["--shapes", "1,2,16,16,8", "2,4,5,9,8,4,2", "--causal", "--quick",
                     "--threads", "1,2", "--peers", "reference", "--json", str(out),
                     "--plot", "", "--markdown", str(md)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 4
    for r in res["rows"]:
        assert r["time"] > 0 and r["gflops"] > 0
        assert r["mode"] == "causal"
        assert "reference" in r["ratio"] and r["ratio"]["reference"] > 0
        assert r["maxdiff"]["reference"] < 1e-4 and not r["mismatch"]
    for t in ("1", "2"):
        assert res["sgemm"][t]["gflops"] > 0 and res["bandwidth"][t]["gbs"] > 0
    text = md.read_text()
    assert "python -m fastattn.bench --shapes 1,2,16,16,8" in text
    assert "| 2x4/2x5x9x8x4 | float32 | causal |" in text.replace(" | causal | ", " | causal |") \
        or "2x4/2x5x9x8x4" in text
    printed = capsys.readouterr().out
    assert "1x2x16x16x8" in printed


def test_run_without_one_thread(tmp_path):
    """A run at thread counts without 1 (no 1-thread rows, no 1-thread ceilings) reports."""
    out = tmp_path / "r.json"
    rc = bench.main(["--shapes", "1,2,1,64,8", "--decode", "--quick", "--threads", "2",
                     "--peers", "", "--json", str(out), "--plot", ""])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["threads"] for r in res["rows"]] == [2] and "1" not in res["bandwidth"]


def test_capped_callable_does_not_use_up_the_budget():
    """A slow capped callable (the NumPy reference) gets min_repeats samples and leaves the
    others their rounds; uncapped, it ends the rounds at min_repeats for everyone."""
    import time
    calls = {"fast": lambda: None, "slow": lambda: time.sleep(0.03)}
    for capped, want in ((("slow",), 6), ((), 3)):
        _, samples, _ = bench.time_interleaved(calls, 6, min_sample=0.0, budget=0.05,
                                               min_repeats=3, capped=capped)
        assert len(samples["fast"]) == want and len(samples["slow"]) == 3


def test_interleaving_varies_each_callables_predecessor():
    """Over four rounds every callable runs after at least two different ones."""
    log = []
    calls = {n: (lambda n=n: log.append(n)) for n in ("a", "b", "c", "d")}
    bench.time_interleaved(calls, 4, min_sample=0.0)
    runs = log[len(calls):]                         # after the warm-up calls
    before = {n: {p for p, x in zip(runs, runs[1:]) if x == n} for n in calls}
    assert all(len(p) >= 2 for p in before.values()), before


def test_a_slow_first_call_does_not_size_the_samples():
    """A call slow only after an idle gap (a thread or core waking) is sized by its fast
    calls: each sample then holds many calls and pays the wake-up once, not every few calls."""
    import time
    last = [0.0]

    def call():
        now = time.perf_counter()
        spin = 5e-3 if now - last[0] > 5e-3 else 1e-4     # the wake-up, else the work
        while time.perf_counter() - now < spin:
            pass
        last[0] = time.perf_counter()

    med, samples, _ = bench.time_interleaved({"f": call}, 3, min_sample=0.02, settle=0.01)
    assert med["f"] < 1e-3, samples            # sized by the first call: about 1.3 ms


def test_run_with_more_rounds_than_the_reference_gets(tmp_path):
    """Five rounds: the reference has three samples, fastattn five; the row still reports."""
    out = tmp_path / "r.json"
    rc = bench.main(["--shapes", "1,2,16,16,8", "--quick", "--repeats", "5", "--threads", "1",
                     "--peers", "reference", "--json", str(out), "--plot", ""])
    assert rc == 0
    row = json.loads(out.read_text())["rows"][0]
    assert len(row["samples"]["fastattn"]) == 5 and len(row["samples"]["reference"]) == 3
    assert row["ratio_paired"]["reference"] > 0


def test_evaluate_marks_misses():
    row = dict(target="e", shape="1x1x1x1x64", dtype="float32", mode="full", threads=1,
               time=25e-6, ratio={}, decode=False)
    res = {"rows": [row], "sgemm": {"1": {"gflops": 90.0}}, "bandwidth": {"1": {"gbs": 30.0}}}
    (t,) = bench.evaluate(res)
    assert t["target"] == "e" and t["met"] is False and "25.0 us" in t["measured"]
    row["time"] = 4e-6
    assert bench.evaluate(res)[0]["met"] is True


def test_a_ceiling_fraction_far_above_one_is_not_met():
    """a rate far above its own ceiling means the ceiling measurement was disturbed (a busy
    machine once gave 4 GF/s at 2 threads): such a criterion is a miss, saying why; a few
    percent above it is noise in the ceiling's best sample"""
    row = dict(target="a", shape="8x12x512x512x64", dtype="float32", mode="full", threads=2,
               time=0.1, gflops=60.0, ratio={}, decode=False)
    res = {"rows": [row], "sgemm": {"2": {"gflops": 4.1}}, "bandwidth": {}}
    (t,) = bench.evaluate(res)
    assert t["met"] is False and "ceiling was measured too low" in t["measured"]
    res["sgemm"]["2"]["gflops"] = 80.0
    assert bench.evaluate(res)[0]["met"] is True
    res["sgemm"]["2"]["gflops"] = 57.0                 # 1.05 of the ceiling
    assert bench.evaluate(res)[0]["met"] is True


def test_markdown_marks_miss_loudly():
    res = {"rows": [], "targets": [{"target": "a", "what": "x", "measured": "0.5x",
                                    "met": False}],
           "options": {"threads": [1]}, "sgemm": {"1": {"gflops": 1.0}},
           "bandwidth": {"1": {"gbs": 1.0}}, "elapsed": 1.0,
           "machine": {"cpu": "cpu", "cores": 1, "python": "3", "platform": "p",
                       "config": {"simd": "x"}, "peers": {}, "env": {}}}
    assert "| a | x | 0.5x | - | **NO** |" in bench.markdown(res, [])


def test_memory_child_reports_extra_rss(capsys):
    spec = {"case": dict(B=1, Hq=1, Lq=256, Lk=256, D=16, Dv=16, Hkv=1, dtype="float32",
                         causal=False), "threads": 1, "runner": "fastattn"}
    bench._memory_child(spec)
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(r["extra_mb"]) and r["extra_mb"] < 64


def test_collision_without_threadpoolctl_says_so(monkeypatch):
    """without threadpoolctl the 'NumPy's BLAS held to 1 thread' figure is n/a, not a second
    unlimited run under that label"""
    from contextlib import nullcontext
    monkeypatch.setattr(bench, "_blas_limit",
                        lambda n, required=False: None if required else nullcontext())
    c = bench.collision(1, repeats=2, peers=())["fastattn"]
    assert c["after_matmul_blas1"] is None and c["after_matmul"] > 0
    assert bench._blas1_ms(c) == "n/a (threadpoolctl not installed)"


@pytest.mark.parametrize("argv", [["--threads", "abc"], ["--threads", "5000"], ["--threads", "0"],
                                  ["--repeats", "0"]])
def test_blocks_benchmark_refuses_bad_options(argv):
    """bench/bench_blocks.py: a bad option is argparse's usage error (exit 2), not a
    traceback after minutes of work"""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_blocks.py"
    r = subprocess.run([sys.executable, str(script)] + argv, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr, r.stderr
