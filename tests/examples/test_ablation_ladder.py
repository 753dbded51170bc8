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
    delta = float(row.split("│")[7])
    assert abs(delta - (psnr["no_norm"] - psnr["base"])) <= 0.011  # both printed to 0.01
