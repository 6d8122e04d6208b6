"""The side-by-side benchmark harness: tvix-mountd against native, bindfs and squashfuse_ll.

`python -m benchmarks.run` builds (once, cached under benchmarks/work/) the same
data as a native tree, a squashfs image and an embedded tvix store, mounts each
peer, measures every workload on every peer in one run and prints the medians
and their ratios next to the targets in DESIGN.md. `python -m benchmarks.profile`
runs one workload against a tvix-mountd daemon under py-spy or cProfile.
"""
