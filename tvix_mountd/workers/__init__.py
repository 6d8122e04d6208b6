"""FUSE workers: the filesystem over a store view, its inode table, the mount."""
