"""The README's tutorial: the seed's line service, written as a user service.

    USTACK_SERVICES=tcp/9000=myservices:Reverse,udp/9000=myservices:reverse PYTHONPATH=examples scripts/run
"""

from workers.services.tcp import Service


class Reverse(Service):
    """Each line that arrives goes back reversed; a partial line waits for the rest."""

    def __init__(self, stream):
        super().__init__(stream)
        self.partial = b""

    def on_readable(self):
        while not self.pending and (data := self.stream.recv()):  # nothing held back: read on
            *lines, self.partial = (self.partial + data).split(b"\n")
            self.write(b"".join(line.strip()[::-1] + b"\n" for line in lines))


def reverse(payload):
    """UDP: the datagram's text reversed (return None to send no reply)."""
    return payload.strip()[::-1] + b"\n"
