from __future__ import annotations

from helpers import run_example


def test_architecture_audit_quick(tmp_path):
    result = run_example(
        "examples/architecture_audit.py",
        "--quick",
        "--architectures",
        "vit_tiny",
        "convnext_atto",
        "--out",
        str(tmp_path),
    )
    lines = result.stdout.splitlines()
    for arch in ("vit_tiny", "convnext_atto"):
        rows = [line for line in lines if arch in line and "dB" not in line]
        assert {"all", "stem", "head"} <= {r.split("│")[2].strip() for r in rows}
    assert "grey image" in result.stdout
    assert (tmp_path / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    # the ViT's stem (patch + position embeddings) attacked in closed form gives the photo back
    closed = [line for line in lines if line.startswith("# vit_tiny stem, closed form")]
    assert len(closed) == 1 and float(closed[0].split("PSNR ")[1].split(" dB")[0]) >= 30.0
    assert not any(line.startswith("# convnext_atto stem, closed form") for line in lines)


def test_stem_noise_table_quick(tmp_path):
    """The stem-noise table: the closed-form attack and the I²F both fall with the noise; the
    I²F exactly by 20 dB per decade (``std · sqrt(tr)``)."""
    result = run_example(
        "examples/architecture_audit.py",
        "--architectures",
        "vit_tiny",
        "--groups",
        "stem",
        "--images",
        "2",
        "--iterations",
        "2",
        "--image-size",
        "8",
        "--stem-noise",
        "1e-6,1e-2",
        "--group-i2f",
        "1e-2",
        "--out",
        str(tmp_path),
    )
    rows = {}
    for line in result.stdout.splitlines():
        if line.startswith("# stem noise "):
            std = float(line.split()[3].rstrip(":"))
            attack = float(line.split("attack ")[1].split(" ±")[0])
            i2f = float(line.split("I2F ")[1].split(" ±")[0])
            rows[std] = (attack, i2f)
    assert set(rows) == {1e-6, 1e-2}
    assert rows[1e-6][0] > rows[1e-2][0] + 10.0  # the attack degrades with the noise
    assert abs((rows[1e-6][1] - rows[1e-2][1]) - 80.0) < 0.05  # 4 decades of std
    # the per-group table's stem row is the same I²F as the stem-noise table's at that std
    (group,) = [line for line in result.stdout.splitlines() if line.startswith("# group stem:")]
    assert abs(float(group.split("I2F ")[1].split(" ±")[0]) - rows[1e-2][1]) < 0.01
