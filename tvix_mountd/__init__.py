"""tvix-mountd: read-only FUSE views of a tvix content-addressed store."""

# The one place the version is written (pyproject.toml reads it from here).
# A worker logs it with where it was imported from: after `tvix-mountd
# restart`, the log shows which code each mount runs.
__version__ = "0.1.0"
