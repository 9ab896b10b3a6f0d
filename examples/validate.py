"""Validate: one ONNX graph against its PyTorch model again, e.g. with a tighter tolerance.

python examples/validate.py [MODEL_DIR]        # default: models/example
"""

import sys
from pathlib import Path

from segdeploy.validate import validate_onnx


def main() -> None:
    model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "models/example")
    report = validate_onnx(
        model_dir / "onnx" / "model.onnx", model_dir, tolerance=0.0005, write=False
    )
    print(f"mean IoU {report.get('mean_iou_onnx')} vs PyTorch {report.get('mean_iou_torch')}")
    print(f"pixel agreement {report['pixel_agreement']:.4%}; rules: {', '.join(report['rules'])}")
    sys.exit(0 if report["passed"] else 1)


# The guard matters: segdeploy's worker processes import this script again, and a script
if __name__ == "__main__":
    main()
