"""The supervisor: config, processes, the rootcache, health."""
