import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from qcompiler.tools import cli


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert cli.main(["report", "--model", "stories260k", "--recipe", "w8a8-smoothquant", "--out", str(out),
                     "--samples", "8", "--seq-len", "64", "--tokens", "512", "--recipes", "w8a8-dynamic"]) == 0
    return out


def test_report_cli_writes_html_with_its_plots(report_dir):
    out = report_dir
    page = (out / "index.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert parser.tags[0] == "html" and "body" in parser.tags
    assert len(parser.images) == 3
    for src in parser.images:
        data = base64.b64decode(re.sub("^data:image/png;base64,", "", src))
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    for name in ("outliers.png", "sqnr.png", "perplexity_vs_bits.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "Per-layer SQNR" in page and "fp32" in page and "w8a8-dynamic" in page
    assert "model.layers.0.self_attn.q_proj" in page


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine: the HTML check above still runs")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1100,2600", f"--screenshot={shot}", (report_dir / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2600, 1100)
    # the page is drawn, plots included: a blank or broken-image page is nearly all white
    coloured = (pixels.max(-1) - pixels.min(-1)) > 0.2
    assert coloured.mean() > 0.02, coloured.mean()


def test_a_report_without_statistics_says_why_the_outlier_plot_is_missing(tmp_path):
    out = tmp_path / "report"
    assert cli.main(["report", "--model", "stories260k", "--recipe", "w8a8-dynamic", "--out", str(out),
                     "--tokens", "256"]) == 0
    page = (out / "index.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert len(parser.images) == 2 and not (out / "outliers.png").exists()
    assert "Activation outliers" in page and "Not drawn: recipe w8a8-dynamic needs no calibration" in page
    assert "--stats DIR" in page


def test_pareto_front_keeps_the_points_nothing_beats_in_both():
    from qcompiler.tools.report_html import pareto_front

    points = [{"bpw": 32, "perplexity": 10.0}, {"bpw": 8, "perplexity": 10.1}, {"bpw": 9, "perplexity": 10.2},
              {"bpw": 4, "perplexity": 12.0}, {"bpw": 4, "perplexity": 12.0}, {"bpw": 16, "perplexity": 9.0}]
    assert pareto_front(points) == [3, 4, 1, 5]  # by bits; equal points do not dominate each other


def test_report_plots_autotunes_recipe_file_with_its_bits_and_perplexity(tmp_path, capsys):
    import json

    from qcompiler.tools.report_html import pareto_front

    auto = tmp_path / "auto"
    assert cli.main(["autotune", "--model", "stories260k", "--target-bpw", "10.5", "--cache", str(tmp_path / "c"),
                     "--samples", "1", "--seq-len", "32", "--candidates", "float", "w8-channel", "w4-g64",
                     "--out", str(auto)]) == 0
    tuned = json.loads((auto / "autotune.json").read_text())
    out = tmp_path / "report"
    assert cli.main(["report", "--model", "stories260k", "--recipe", "w8a8-dynamic", "--out", str(out),
                     "--tokens", "256", "--recipes", str(auto), "w4a16-rtn"]) == 0
    points = json.loads((out / "perplexity_vs_bits.json").read_text())
    assert [(p["recipe"], p["kind"]) for p in points] == [
        ("fp32", "float"), ("w8a8-dynamic", "preset"), ("auto-10.5bpw", "file"), ("w4a16-rtn", "preset")]
    by_name = {p["recipe"]: p for p in points}
    assert by_name["fp32"]["bpw"] == 32.0
    # whole-model bits as autotune counts them: the tuned recipe lands exactly where the search put it
    assert by_name["auto-10.5bpw"]["bpw"] == pytest.approx(tuned["bits_per_weight"], rel=1e-12)
    assert 10 < by_name["w8a8-dynamic"]["bpw"] < 32
    front = set(pareto_front(points))
    assert [p["pareto"] for p in points] == [i in front for i in range(len(points))] and front
    page = (out / "index.html").read_text()
    for p in points:  # the table under the plot lists every recipe with its bits and perplexity
        assert f"{p['recipe']:<28} {p['bpw']:7.3f} bpw  perplexity {p['perplexity']:8.3f}" in page
    assert (out / "perplexity_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
