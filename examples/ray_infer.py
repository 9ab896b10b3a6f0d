"""Ray: segment a Ray Dataset of images with SegmentBatch (one Segmenter per actor).

    python examples/ray_infer.py [MODEL_DIR] PHOTOS    # a private Ray on this machine

For the whole folder job on a cluster, `segdeploy infer --engine ray --ray-address HEAD:6379`.
"""

import sys
from pathlib import Path

from segdeploy.runtime.ray_engine import SegmentBatch
from segdeploy.runtime.ray_session import ray_session


def main() -> None:
    model_dir = str(Path(sys.argv[1] if len(sys.argv) > 1 else "models/example").resolve())
    photos = sorted(
        Path(sys.argv[2] if len(sys.argv) > 2 else "models/demo/data/images").glob("*.png")
    )

    # A private Ray for this script, on 127.0.0.1 only, gone at the end: the one segdeploy
    # starts for itself (ray_session("auto") would join `ray start --head`'s instead).
    with ray_session(None, num_cpus=2):
        import ray

        ds = ray.data.from_items([{"image": str(p)} for p in photos[:8]])  # paths or HxWx3 arrays
        ds = ds.map_batches(
            SegmentBatch,
            fn_constructor_kwargs={"model_dir": model_dir, "provider": "cpu", "threads": 1},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=4,
        )
        for row in ds.take_all():
            print(Path(row["image"]).name, row["labels"].shape)


# The guard matters: segdeploy's worker processes import this script again, and a script
if __name__ == "__main__":
    main()
