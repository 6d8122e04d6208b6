"""tvix-mountd: read-only FUSE views of a tvix content-addressed store."""
