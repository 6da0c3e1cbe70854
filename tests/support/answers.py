"""The broker's fixed answers that several test modules compare whole bodies against, written out in full."""

KEPT = {
    "error": "upstream_timeout",
    "message": "The identity provider did not answer in time; retry with the same refresh token: the broker keeps "
    "its answer if one arrives",
}
LOST = {
    "error": "upstream_unavailable",
    "message": "The connection to the identity provider broke before its answer arrived; try again",
}
BUSY = {
    "error": "upstream_unavailable",
    "message": "Too many requests are waiting for the identity provider; try again shortly",
}
UNCOORDINATED = {
    "error": "upstream_unavailable",
    "message": "The broker cannot coordinate this refresh with its other processes right now; try again shortly",
}
