import base64
import re
from html.parser import HTMLParser

from qcompiler import cli


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_report_cli_writes_html_with_its_plots(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["report", "--model", "stories260k", "--recipe", "w8a8-smoothquant", "--out", str(out),
                     "--samples", "8", "--seq-len", "64", "--tokens", "512", "--recipes", "w8a8-dynamic"]) == 0
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
