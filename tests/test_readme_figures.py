"""README's figures do not contradict the benchmark tables: the throughput and learning tables
live only in benchmarks/README.md (README links them, to headings that exist), and the quick
start's time is the one the demo config prints."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BENCH = (ROOT / "benchmarks" / "README.md").read_text()


def github_anchor(heading):
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def table_headers(text):
    return [line for line in text.splitlines() if line.startswith("| ") and
            text.splitlines()[text.splitlines().index(line) + 1].startswith("|---")]


def test_benchmark_tables_live_only_in_benchmarks_readme():
    figures = [h for h in table_headers(README) if re.search(r"img/s|MFU|top-1", h)]
    assert not figures, figures
    assert any("img/s" in h and "MFU" in h for h in table_headers(BENCH))


def test_readme_links_to_benchmark_sections_that_exist():
    anchors = {github_anchor(line.lstrip("#")) for line in BENCH.splitlines() if line.startswith("#")}
    links = re.findall(r"\(benchmarks/README\.md#([^)]+)\)", README)
    assert len(links) >= 2
    assert set(links) <= anchors, set(links) - anchors


def test_quick_start_time_is_the_demo_configs():
    stated = re.search(r"# 1\. install and pretrain \(MAE demo[^)]*?(about [0-9]+ (?:s|minutes?))", README)
    assert stated, "README's quick start states no time"
    config = (ROOT / "configs" / "demo" / "mae.yaml").read_text()
    expected = re.search(r"# expect:.*?(about [0-9]+ (?:s|minutes?)) on 2 cores", config)
    assert expected and stated.group(1) == expected.group(1)
