"""Schemathesis hooks of tests/webrtc/openapi_check.py (loaded through SCHEMATHESIS_HOOKS): the
WHIP and WHEP offers are `application/sdp`, text that Schemathesis has no serializer for."""

import schemathesis


@schemathesis.serializer("application/sdp")
def sdp(ctx, value):
    if isinstance(value, bytes):
        return {"data": value}
    return {"data": str(value).encode("utf-8")}
