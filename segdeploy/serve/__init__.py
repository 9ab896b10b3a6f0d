"""`segdeploy serve`: the exported model behind an HTTP service on Ray Serve.

A front end over the runtime's `Segmenter`, like the folder job (runtime/infer.py)
and Ray Data (runtime/ray_engine.py):

- `settings`: ServeSettings, the command's options;
- `model`: one replica's stages (decode, prepare, batched forward, upsample, PNG),
  the same as `segdeploy infer`'s;
- `protocol`: the Open Inference Protocol (KServe v2) codec;
- `app`: the HTTP API (FastAPI), `metrics` (Prometheus), `page` (GET /);
- `deployments`: the Ray Serve deployments (one replica: the API and the model in it;
  more: a front end over the model replicas);
- `service`: start, run, drain and stop.

Imports neither torch nor transformers; Ray, FastAPI and prometheus_client come with
the extra (pip install 'segdeploy[serve]') and are imported only by the modules that
need them.
"""
