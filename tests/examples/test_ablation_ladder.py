from __future__ import annotations

from helpers import run_example


def test_ablation_ladder_quick():
    """Every variant trains and is attacked; the table has the paper's step beside ours."""
    result = run_example("examples/ablation_ladder.py", "--quick", columns=160)
    lines = [line for line in result.stdout.splitlines() if line.startswith("# ")]
    variants = [line[2:].split(":")[0] for line in lines]
    assert variants == ["base", "patchify", "gelu", "fewer_act", "no_norm", "layer_norm"]
    assert "+17.51" in result.stdout  # the paper's step for removing activations
    psnr = {
        v: float(line.split("PSNR ")[1].split(" dB")[0])
        for v, line in zip(variants, lines, strict=True)
    }
    # the table's "Δ PSNR vs base" column is each variant's PSNR minus the base's
    row = next(line for line in result.stdout.splitlines() if line.startswith("│ no_norm"))
    delta = float(row.split("│")[8])
    assert abs(delta - (psnr["no_norm"] - psnr["base"])) <= 0.011  # both printed to 0.01


def test_cumulative_ladder_quick(tmp_path):
    """The ladder stacks the changes in the paper's order, each step against the one before;
    the grid has the truth and one row per step."""
    grid = tmp_path / "ladder.png"
    result = run_example(
        "examples/ablation_ladder.py", "--quick", "--cumulative", "--grid", str(grid), columns=200
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("# ")]
    steps = [line[2:].split(":")[0] for line in lines]
    assert steps == ["base", "patchify", "gelu", "fewer_act", "fewer_norm", "layer_norm"]
    psnr = [float(line.split("PSNR ")[1].split(" dB")[0]) for line in lines]
    row = next(line for line in result.stdout.splitlines() if line.startswith("│ layer_norm"))
    assert "+ BatchNorm -> LayerNorm" in row
    assert abs(float(row.split("│")[8]) - (psnr[5] - psnr[4])) <= 0.011  # vs the previous step
    assert grid.read_bytes()[:4] == b"\x89PNG" and grid.stat().st_mode & 0o077 == 0


def test_a_cumulative_step_has_every_change_before_it():
    import sys

    sys.path.insert(0, "examples")
    from ablation_ladder import build, changes_of

    assert changes_of("fewer_act", cumulative=True) == {"patchify", "gelu", "fewer_act"}
    assert changes_of("fewer_act", cumulative=False) == {"fewer_act"}
    net = build(changes_of("layer_norm", cumulative=True), classes=3)
    kinds = {type(m).__name__ for m in net.modules()}
    assert "GroupNorm" in kinds and "BatchNorm2d" not in kinds and "ReLU" not in kinds
    assert type(net[1].norm2).__name__ == "Identity" and type(net[1].act1).__name__ == "Identity"
