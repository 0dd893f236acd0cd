"""The functional core is pure PyTorch: importing it must not import Lightning."""

import subprocess
import sys


def test_functional_does_not_import_lightning() -> None:
    code = (
        "import sys, lightning_geometry.functional as f, lightning_geometry.functional.curvature, "
        "lightning_geometry.functional.sharpness, lightning_geometry.functional.hessian; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
