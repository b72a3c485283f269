"""Data: on-disk formats, the embedded demo data, augmentation, collate and DataModules."""
