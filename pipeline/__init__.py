"""The ustack pipeline: TUN device, bus, ingress and egress processes."""

from pipeline import compiled

compiled.activate()  # before any hot module is imported: compiled build if usable, else pure
