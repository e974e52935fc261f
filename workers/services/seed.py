"""The seed's reply, shared by the UDP and TCP services on port 8000."""


def reverse_line(text_bytes: bytes) -> bytes:
    """The text stripped of surrounding white space, reversed, plus a newline.

    Reversal is by character, not byte, so UTF-8 text stays valid; bytes that
    are not UTF-8 survive the round trip via surrogate escapes.
    """
    text = text_bytes.decode("utf-8", "surrogateescape").strip()
    return (text[::-1] + "\n").encode("utf-8", "surrogateescape")
