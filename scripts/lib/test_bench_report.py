#!/usr/bin/env python3
"""Tests of bench-report.py (the report of scripts/bench.sh) on made-up results.

    /usr/bin/python3 scripts/lib/test_bench_report.py   (Debian's python3: matplotlib)

The benchmark itself is not a test; what it reports is computed here, and a wrong
ratio would go into docs/performance.md unnoticed.
"""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(HERE, "bench-report.py")
spec = importlib.util.spec_from_file_location("bench_report", REPORT)
br = importlib.util.module_from_spec(spec)
spec.loader.exec_module(br)


def read(path):
    with open(path) as f:
        return f.read()


def run(rnd, backend, job, metrics, cpu=None, rss=None):
    r = {"round": rnd, "backend": backend, "job": job, "metrics": metrics, "wall_s": 1.0}
    if backend != "raw":
        r["daemon_cpu_s"] = cpu if cpu is not None else 0.5
        r["daemon_peak_rss_kib"] = rss if rss is not None else 20480
    return r


# Round 1: raw 1000 MB/s, earfs 900 (0.9); round 2: raw 500, earfs 500 (1.0);
# round 3: raw 800, earfs 400 (0.5). Median ratio 0.9, not 1800/2300 or median 500/800.
RUNS = [
    run(1, "raw", "seqwrite-1m", {"MBps": 1000, "bytes": 2**30}),
    run(1, "earfs", "seqwrite-1m", {"MBps": 900, "bytes": 2**30}, cpu=0.8),
    run(1, "gocryptfs", "seqwrite-1m", {"MBps": 300, "bytes": 2**30}, cpu=2.0),
    run(2, "raw", "seqwrite-1m", {"MBps": 500, "bytes": 2**30}),
    run(2, "earfs", "seqwrite-1m", {"MBps": 500, "bytes": 2**29}, cpu=0.5),
    run(2, "gocryptfs", "seqwrite-1m", {"MBps": 100, "bytes": 2**30}, cpu=2.0),
    run(3, "raw", "seqwrite-1m", {"MBps": 800, "bytes": 2**30}),
    run(3, "earfs", "seqwrite-1m", {"MBps": 400, "bytes": 2**30}, cpu=0.7),
    run(3, "gocryptfs", "seqwrite-1m", {"MBps": 200, "bytes": 2**30}, cpu=2.0),
    # A time: lower is better; earfs takes 1.1x (met, <= 1.2), gocryptfs 2x.
    run(1, "raw", "pgbench-init", {"seconds": 10}),
    run(1, "earfs", "pgbench-init", {"seconds": 11}),
    run(1, "gocryptfs", "pgbench-init", {"seconds": 20}),
    # Seconds per phase become files per second.
    run(1, "raw", "metadata", {"files": 1000, "create_s": 1, "stat_s": 1, "readdir_s": 1, "unlink_s": 1}),
    run(1, "earfs", "metadata", {"files": 1000, "create_s": 4, "stat_s": 1, "readdir_s": 1, "unlink_s": 2},
        rss=150 * 1024),
]


class Report(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "results.jsonl")
        with open(self.path, "w") as f:
            for r in RUNS:
                f.write(json.dumps(r) + "\n")

    def tearDown(self):
        self.dir.cleanup()

    def rows(self):
        backends, rounds, rows, daemon = br.summarize(br.load(self.path))
        return backends, rounds, {r["key"]: r for r in rows}, daemon

    def test_ratio_is_the_median_of_the_rounds_ratios(self):
        backends, rounds, rows, _ = self.rows()
        self.assertEqual(backends, ["raw", "earfs", "gocryptfs"])
        self.assertEqual(rounds, [1, 2, 3])
        w = rows["seqwrite"]
        self.assertAlmostEqual(w["ratios"]["earfs"], 0.9)
        self.assertAlmostEqual(w["ratios"]["gocryptfs"], 0.25)
        self.assertEqual(w["values"]["earfs"], 500)
        self.assertFalse(w["met"])  # 0.9 < 0.95

    def test_lower_is_better_jobs(self):
        _, _, rows, _ = self.rows()
        p = rows["pg-init"]
        self.assertAlmostEqual(p["ratios"]["earfs"], 1.1)
        self.assertTrue(p["met"])  # 1.1 <= 1.2
        self.assertAlmostEqual(p["ratios"]["gocryptfs"], 2.0)

    def test_metadata_phases_are_rates(self):
        _, _, rows, daemon = self.rows()
        self.assertAlmostEqual(rows["meta-create"]["ratios"]["earfs"], 0.25)
        self.assertFalse(rows["meta-create"]["met"])
        self.assertTrue(rows["meta-stat"]["met"])
        self.assertAlmostEqual(rows["meta-unlink"]["ratios"]["earfs"], 0.5)
        self.assertEqual(daemon["earfs"]["peak_rss_mib_metadata"], 150)

    def test_daemon_cpu_per_gib(self):
        _, _, _, daemon = self.rows()
        # 0.8 s for 1 GiB, 0.5 s for 0.5 GiB (1.0 s/GiB), 0.7 s for 1 GiB: median 0.8.
        self.assertAlmostEqual(daemon["earfs"]["cpu_s_per_gib_written"], 0.8)
        self.assertAlmostEqual(daemon["gocryptfs"]["cpu_s_per_gib_written"], 2.0)

    def test_jobs_without_results_are_left_out(self):
        _, _, rows, _ = self.rows()
        self.assertNotIn("randread", rows)

    def test_the_docs_section_is_replaced_not_appended(self):
        docs = os.path.join(self.dir.name, "docs")
        os.mkdir(docs)
        with open(os.path.join(docs, "performance.md"), "w") as f:
            f.write("# Performance\n\n## Older section\n\nkept\n")
        machine = json.dumps({"date": "2026-11-30", "cpu": "test"})
        for _ in range(2):
            subprocess.run([sys.executable, REPORT, self.path, self.dir.name, "--machine", machine,
                            "--mode", "quick", "--params", "p", "--docs", docs],
                           check=True, capture_output=True)
        text = read(os.path.join(docs, "performance.md"))
        self.assertEqual(text.count(br.BEGIN), 1)
        self.assertEqual(text.count(br.END), 1)
        self.assertTrue(text.startswith("# Performance\n\n" + br.BEGIN))
        self.assertIn("## Older section\n\nkept\n", text)
        self.assertIn("| fio 1 MiB sequential write | ≥ 0.95× | 800 MB/s | 500 MB/s (**0.90×**) ✗ |", text)
        self.assertIn("| daemon peak resident memory, 1,000 files known | ≤ 100 MiB | – | 150 MiB ✗ | – |", text)
        svg = read(os.path.join(docs, "performance.svg"))
        self.assertIn("<svg", svg)
        self.assertIn("fio 1 MiB sequential write", svg)
        doc = json.loads(read(os.path.join(docs, "bench-results.json")))
        self.assertEqual(doc["schema"], "earfs.bench.v1")
        self.assertEqual(len(doc["runs"]), len(RUNS))


if __name__ == "__main__":
    unittest.main()
