"""Serving a trained policy to robots over websockets, in openpi's protocol (docs/serving.md).

- :mod:`vla_ds.serving.server`: ``PolicyServer`` (metadata on connect, one observation per
  request, batching across clients, ``/healthz``, API key);
- :mod:`vla_ds.serving.client`: ``PolicyClient`` and ``ActionChunker`` for the robot side
  (numpy, msgpack and websockets only: no torch needed there);
- :mod:`vla_ds.serving.spec`: the request layout and its checks;
- :mod:`vla_ds.serving.wire`: msgpack with numpy arrays, never pickle.
"""
