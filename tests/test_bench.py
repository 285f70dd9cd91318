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
                                  ["--markdown", "/proc/no/such/dir/x.md"],
                                  ["--json", "-"], ["--plot", "-"],
                                  ["--dtype", "float8"], ["--dtype", ""],
                                  ["--peers", "nosuchpeer"], ["--repeats", "0"],
                                  ["--repeats", "-3"], ["--full"],
                                  ["--shapes", "1,,4,16,16,8"],
                                  ["--shapes", "100000,100000,100000,100000,1000"],
                                  ["--shapes", "1,1,8,8,8", "--window=2,-5"]])
def test_bad_options_stop_with_a_usage_error_before_any_run(argv, capsys):
    """an option the run cannot use (GQA heads that do not divide, a thread count above the
    limit, a negative sleep, an output path that cannot be written) stops at once with
    argparse's usage error, not with a traceback after the measurements"""
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick"] + argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_shape_fields_do_not_shift_and_threads_are_sorted():
    """an empty Dv field (B,H,Lq,Lk,D,,Hkv) means Dv = D: it was dropped, and Hkv became Dv;
    thread counts run in ascending order, each once"""
    assert bench.parse_shape("1,4,16,16,8,,2") == dict(B=1, Hq=4, Lq=16, Lk=16, D=8, Dv=8,
                                                       Hkv=2)
    assert bench.parse_shape("1x4x16x16x8x") == dict(B=1, Hq=4, Lq=16, Lk=16, D=8)
    for bad in ("1,,4,16,16,8", "1,4,16,16,8,,"  ",2,3"):
        with pytest.raises(Exception):
            bench.parse_shape(bad)
    assert bench._threads_arg("2,1,2") == (1, 2)


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
    assert "## Targets" not in text and "criteria met" not in text   # it said '0 of 0'
    assert "| 2x4/2x5x9x8x4 | float32 | causal |" in text.replace(" | causal | ", " | causal |") \
        or "2x4/2x5x9x8x4" in text
    printed = capsys.readouterr().out
    assert "1x2x16x16x8" in printed


def test_markdown_keeps_the_blocks_section(tmp_path):
    """--markdown bench/RESULTS.md (the README's command) rewrote the whole file and deleted
    the section bench/bench_blocks.py had written into it"""
    md = tmp_path / "R.md"
    section = "## Transformer blocks (issue 3), from `bench/bench_blocks.py`"
    blocks = section + "\n\n| threads | ... |\n| 1 | 170.4 / 172.7 |\n"
    md.write_text("# old report\n\nold rows\n\n" + blocks)
    assert bench.main(["--shapes", "1,1,8,8,8", "--quick", "--threads", "1", "--peers", "",
                       "--json", "", "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "old rows" not in text and "1x1x8x8x8" in text
    assert text.count(section) == 1 and "| 1 | 170.4 / 172.7 |" in text


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


def test_a_peer_that_fails_is_n_a_not_the_end_of_the_run(monkeypatch):
    """a peer raising on its first call (onnxruntime could not allocate the 34 GB of scores
    of 1x2x65536x65536x1, which fastattn runs in little memory) ended the whole run with a
    traceback and no JSON; now the peer is n/a with the reason, and a shape whose scores
    exceed the memory is refused before onnxruntime is asked"""
    def failing(case, n, q, k, v):
        def call():
            raise RuntimeError("Failed to allocate memory for requested buffer")
        return call, ""
    monkeypatch.setitem(bench.MAKERS, "reference", failing)
    opts = bench.Options(threads=(1,), repeats=2, min_sample=0.0, settle=0.0,
                         peers=("reference",))
    (row,) = bench.run_case(bench.Case(1, 1, 8, 8, 8), opts)
    assert "reference" not in row["ratio"] and "allocate" in row["unavailable"]["reference"]
    assert bench._fmt_ratio(row, "reference") == "n/a"
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    big = bench.Case(1, 8, 65536, 65536, 8)          # 137 GB of scores; nothing is allocated
    f, why = bench.make_onnxruntime(big, 1, None, None, None)
    assert f is None and "GB of scores" in why
    pytest.importorskip("torch")                     # its math path (Dv != D) does the same
    f, why = bench.make_torch(bench.Case(1, 8, 65536, 65536, 8, Dv=4), 1, None, None, None)
    assert f is None and "GB of scores" in why


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

    def ceiling_criterion():
        (t,) = [t for t in bench.evaluate(res) if "of sgemm" in t["what"]]
        return t
    t = ceiling_criterion()
    assert t["met"] is False and "ceiling was measured too low" in t["measured"]
    res["sgemm"]["2"]["gflops"] = 80.0
    assert ceiling_criterion()["met"] is True
    res["sgemm"]["2"]["gflops"] = 57.0                 # 1.05 of the ceiling
    assert ceiling_criterion()["met"] is True


def test_a_peer_criterion_not_measured_is_not_met():
    """a target row whose peer did not run (not installed, failed) left its ratio criteria
    out of the count, so the summary read 'N of N met' over fewer criteria"""
    row = {"target": "d", "shape": "8x12x1x1024x64", "threads": 1, "gbs": 20.0,
           "ratio": {}, "unavailable": {"torch": "not installed"}, "cpu_share": 1.0}
    res = {"rows": [row], "bandwidth": {}, "sgemm": {}}
    (t,) = bench.evaluate(res)
    assert t["met"] is False and "not measured" in t["measured"] and "installed" in t["measured"]


def test_a_failed_memory_subprocess_is_a_miss():
    """row h whose subprocess failed was dropped from the criteria ('N of N met')"""
    res = {"rows": [], "memory": [{"runner": "fastattn", "threads": 1,
                                   "shape": "1x1x16384x16384x64", "error": "boom"}]}
    (t,) = bench.evaluate(res)
    assert t["target"] == "h" and t["met"] is False and "boom" in t["measured"]


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


def test_memory_subprocess_does_not_need_a_writable_bench_out(tmp_path, monkeypatch):
    """the memory child checked (and created) the default --json path bench/out/ in the
    current directory: where that cannot be written, row h was an error (and its criterion
    left the targets) although the child writes nothing"""
    (tmp_path / "bench").write_text("a file, so bench/out cannot be created")
    monkeypatch.chdir(tmp_path)
    (m,) = bench.memory(bench.Case(1, 1, 64, 64, 8), [1])
    assert "extra_mb" in m, m


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


def test_blocks_benchmark_checks_markdown_and_torch_first_and_records_its_command(tmp_path):
    """bench/bench_blocks.py: an unwritable --markdown path was a traceback after the whole
    run, a missing torch a bare ImportError, and the section it writes gave the command
    '--threads 1,2 --markdown bench/RESULTS.md' whatever the run's options were"""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_blocks.py"
    quick = ["--skip-decode", "--repeats", "1", "--threads", "1"]

    def run(argv, env=None):
        return subprocess.run([sys.executable, str(script)] + quick + argv, capture_output=True,
                              text=True, timeout=300, env=env)
    r = run(["--markdown", "/proc/no/such/dir/x.md"])
    assert r.returncode == 2 and "--markdown" in r.stderr, r.stderr[-300:]
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('no torch here', name='torch')\n"
        "sys.meta_path.insert(0, B())\n")
    import os
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(block)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    r = run([], env=env)
    assert r.returncode == 2 and "torch" in r.stderr and "Traceback" not in r.stderr, r.stderr
    pytest.importorskip("torch")
    md = tmp_path / "R.md"
    r = run(["--markdown", str(md)])
    assert r.returncode == 0, r.stderr[-300:]
    assert "python bench/bench_blocks.py --skip-decode --repeats 1 --threads 1 --markdown" \
        in md.read_text()
