from __future__ import annotations

from helpers import run_example


def test_partial_gradients_quick(tmp_path):
    """Every layer group of both models is attacked with both objectives beside its I²F; the
    ViT's stem alone gives the image back in closed form."""
    grid = tmp_path / "groups.png"
    result = run_example(
        "examples/partial_gradients.py", "--quick", "--grid", str(grid), columns=220
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("# ")]
    groups = {line[2:].split(":")[0] for line in lines}
    assert {"vit stem", "vit attention", "vit mlp", "vit norm", "vit head", "vit all"} <= groups
    assert {"resnet stem", "resnet conv", "resnet norm", "resnet head"} <= groups
    for line in lines:
        if "I2F" in line:  # each group row has the I²F, the cosine and the L2 attack
            assert line.count(" ± ") == 3
    row = next(line for line in result.stdout.splitlines() if "stem, closed form" in line)
    assert float(row.split("│")[5].split("±")[0]) >= 30.0
    assert grid.read_bytes()[:4] == b"\x89PNG" and grid.stat().st_mode & 0o077 == 0
