from __future__ import annotations

from helpers import run_example


def test_targeted_noise_quick():
    """Noise on the stem stops the closed-form stem attack; no defense leaves it exact."""
    result = run_example("examples/targeted_noise.py", "--quick")
    psnr = {}
    for line in result.stdout.splitlines():
        if line.startswith("# "):
            label, rest = line[2:].split(": ", 1)
            psnr[label.split(",")[0]] = float(rest.split("attack ")[1].split(" dB")[0])
    assert set(psnr) == {"none", "stem only", "all layers"}
    assert psnr["none"] >= 60.0  # exact up to float32
    assert psnr["stem only"] < 25.0 < psnr["none"]
    # the same noise energy on every layer leaves the stem attack higher than on the stem alone
    assert psnr["stem only"] < psnr["all layers"]
