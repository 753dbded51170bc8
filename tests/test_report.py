"""The HTML report is self-contained: every image is an inline base64 PNG that decodes."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lightning_privacy.cli import main
from lightning_privacy.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"


class _Resources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        for key in ("href", "src"):
            value = attrs.get(key) or ""
            if value and not value.startswith("data:"):
                self.external.append(value)
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data.strip())
            self._in_h2 = False


def _fake_run(root: Path) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = []
    for i, (label, psnr) in enumerate([("none", 38.0), ("gaussian_noise=0.1", 11.0)]):
        trial = root / "trials" / f"t{i}"
        (trial / "images").mkdir(parents=True)
        fig, ax = plt.subplots(figsize=(2, 1))
        ax.imshow([[0, 1], [1, 0]])
        fig.savefig(trial / "images" / "reconstruction.png")
        plt.close(fig)
        results.append(
            {
                "trial_id": f"t{i}",
                "fingerprint": "x",
                "label": label,
                "status": "ok",
                "defense": label.split("=")[0],
                "val_acc": 0.9 - 0.1 * i,
                "attack_psnr": psnr,
                "predicted_psnr": psnr + 1,
                "epsilon": None,
                "seconds": 1.0,
                "images": ["images/reconstruction.png"],
                "threat_model": {"defended": bool(i), "bn_mode": "eval", "labels_known": False},
                "history": {
                    "attack/psnr": [[10, psnr + 2], [20, psnr]],
                    "leakage/predicted_psnr": [[10, psnr + 3], [20, psnr + 1]],
                    "val/acc": [[10, 0.5], [20, 0.9 - 0.1 * i]],
                },
            }
        )
    import json

    for r in results:
        (root / "trials" / r["trial_id"] / "result.json").write_text(json.dumps(r))
    return results


def _parse(path: Path) -> _Resources:
    parser = _Resources()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_every_image_is_embedded_and_decodes(tmp_path):
    _fake_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    parsed = _parse(tmp_path / "report.html")
    assert parsed.external == []
    # 2 Pareto plots (attack and predicted PSNR; no finite ε), 3 curves, 2 reconstructions
    assert len(parsed.images) == 7
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    for heading in (
        "Results",
        "Privacy-utility Pareto front",
        "Leakage over training",
        "Reconstructions",
        "Threat model",
    ):
        assert heading in parsed.headings


def test_report_of_missing_or_empty_dir_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_write_report_raises_on_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium not installed: `make system-deps` (run by .ci/run) installs Debian's "
    "chromium where apt-get works",
)
def test_report_renders_in_headless_chromium(tmp_path):
    _fake_run(tmp_path)
    report = write_report(tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1000,1400",
            report.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    data = shot.read_bytes()
    assert data[:8] == PNG
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("L")
    # a blank page is one colour; a rendered report has text and plots
    assert len(set(image.getdata())) > 20


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_rendering_writes_no_file_but_report_html(tmp_path):
    _fake_run(tmp_path)
    before = _files(tmp_path)
    write_report(tmp_path)
    assert _files(tmp_path) - before == {"report.html"}
    (tmp_path / "report.html").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert _files(tmp_path) - before == {"report.html"}, "the command writes no Pareto PNG"
    assert not list(tmp_path.glob("pareto_*.png"))


def test_no_formal_dp_has_one_spelling(tmp_path):
    from lightning_privacy.sweep.results import NO_FORMAL_DP

    results = _fake_run(tmp_path)  # gaussian_noise=0.1 has no ε: no formal guarantee
    page = write_report(tmp_path, results=results).read_text()
    table = page.split("<h2>Results</h2>", 1)[1].split("</table>", 1)[0]
    assert NO_FORMAL_DP == "no formal DP"
    assert table.count(f"<td>{NO_FORMAL_DP}</td>") == 1
    assert "no formal guarantee" not in page and "none (no DP)" not in page
