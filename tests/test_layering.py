import subprocess
import sys


def test_functional_does_not_import_lightning():
    code = (
        "import sys, lightning_privacy.functional as F; "
        "bad = [m for m in sys.modules if m == 'lightning' or m.startswith('lightning.') "
        "or m.startswith('pytorch_lightning')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
