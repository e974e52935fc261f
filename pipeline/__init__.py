"""The ustack pipeline: TUN device, bus, ingress and egress processes."""

from pipeline import compiled

# Before any hot module is imported. It reads no file: the first hot import decides
# whether the compiled build is usable (pipeline/compiled.py), so `import pipeline` is free.
compiled.activate()
