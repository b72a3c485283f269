"""On-disk readers (and their writers), one module per format, on one base (:mod:`.base`).

- :mod:`.precomp`: SCAN precomp region features (``PrecompSplit``) and ``write_precomp_split``;
- :mod:`.images`: raw images (``ImageSplit``); :mod:`.shards`: webdataset tar shards;
- :mod:`.hgr`: the HGR video release (``HGRSplit``); :mod:`.frames`: per-video ``.npy`` frame
  features (``FrameNpySplit``), both on :mod:`.video`'s ``VideoSplit``;
- :mod:`.npy`: ``.npy`` headers and positioned row reads.
"""
