"""`fewshotsam2 serve`: one GPU machine segments for many Slicer workstations (Ray Serve), and its client.

- `protocol`: what travels between client and server (the job archive, the API version), pure Python;
- `auth`: tokens (constant-time check) and the rule on where the server may listen;
- `jobs`: the job store: ownership per token, fair queue, limits, events, expiry (no Ray: unit-tested alone);
- `runner`: runs one job on a replica (the one place that calls the segmentation);
- `app`: the Ray Serve application (gateway + model replicas); imported only by `command`;
- `command`: `fewshotsam2 serve`;
- `client`: `fewshotsam2 segment --server URL` (standard library only: no Ray on workstations).
"""
