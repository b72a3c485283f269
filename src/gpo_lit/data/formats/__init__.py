"""On-disk readers (and their writers), one module per format."""
