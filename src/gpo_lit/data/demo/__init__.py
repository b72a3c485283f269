"""The embedded synthetic demo data sets, generated locally from a seed (no download).

- :mod:`.regions`: region features in the SCAN precomp layout (``generate_demo``; the scenes
  and captions every image demo shares, :func:`~.regions.demo_scenes`);
- :mod:`.images`: the same scenes rendered as JPEGs in the raw-image layout;
- :mod:`.shards`: those images packed into webdataset tar shards;
- :mod:`.video`: clips of frame features in the per-video ``.npy`` layout.

One vocabulary (:mod:`.vocab`) and one generate-once protocol (:mod:`.protocol`: already
generated, never clobber, safe under concurrent ranks) serve them all. Each module has a command
line: ``python -m gpo_lit.data.demo.<name> --root DIR [--option value ...]``.
"""
