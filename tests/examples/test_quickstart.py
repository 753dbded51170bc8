from __future__ import annotations

import re

from helpers import REPO, run_example

EXAMPLE = REPO / "examples" / "quickstart.py"


def test_quickstart_runs_quick(tmp_path):
    result = run_example(str(EXAMPLE), "--quick", cwd=tmp_path)
    for key in ("val/acc", "attack/psnr", "leakage/predicted_psnr", "privacy/epsilon"):
        line = next(line for line in result.stdout.splitlines() if key in line)
        assert re.search(r"-?\d+\.\d{3}", line), line  # a measured number, not "—"


def test_readme_quickstart_block_is_the_example():
    """The README's quickstart code is the example's marked block, line for line."""
    source = EXAMPLE.read_text()
    block = source.split("# --8<-- [start:quickstart]\n")[1].split("    # --8<-- [end:quickstart]")[
        0
    ]
    example_lines = [line[4:] for line in block.splitlines() if line.strip()]
    readme = (REPO / "README.md").read_text()
    fenced = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    blocks = [[line for line in f.splitlines() if line.strip()] for f in fenced]
    assert any(b[: len(example_lines)] == example_lines for b in blocks), (
        "no README code block starts with examples/quickstart.py's marked block"
    )
