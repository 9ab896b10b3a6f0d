"""Export: a trained model folder to ONNX (fp32 and fp16), each graph validated against PyTorch.

python examples/export.py [MODEL_DIR]          # default: models/example -> models/example/onnx
"""

import sys

from segdeploy.export import export_onnx


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/example"
    result = export_onnx(model_dir, fp16=True)  # ExportSettings' fields as keywords
    for variant, graph in result.graphs.items():
        report = result.reports.get(variant, {})
        print(f"{variant}: {graph} passed={report.get('passed')} {report.get('reason', '')}")
    sys.exit(0 if result.passed else 1)


# The guard matters: segdeploy's worker processes import this script again, and a script
if __name__ == "__main__":
    main()
