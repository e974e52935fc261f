"""The ustack pipeline: TUN device, bus, ingress and egress processes."""
