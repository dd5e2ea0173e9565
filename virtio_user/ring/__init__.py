"""Virtqueues: ``core`` (what the split and the packed ring share: free ids, tables,
the checks on what callers pass and on what the device returns, faults, waiting),
``split`` (virtio 1.2 "Split Virtqueues", legacy layout) and ``packed`` ("Packed
Virtqueues"). Both rings offer one interface; neither knows about blocks."""
