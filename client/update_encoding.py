"""The train handler's outermost mod: its float32 reply onto the wire as the round config says.

The handler, Flower's `fixedclipping_mod` and the simulation's adversarial mod all see float32
arrays; this one encodes the reply: int8 deltas against the received model with `int8-updates`
(common/quantization.py, which the server decodes with), else float16 with `fp16-transport`,
else float32.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common.quantization import encode_int8_delta
from common.weights import from_arrayrecord, to_arrayrecord


def update_encoding_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Train-handler mod (outermost): the float32 reply onto the wire as the round config says."""
    reply = call_next(msg, ctxt)
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    config = msg.content["config"]
    updated = from_arrayrecord(reply.content["arrays"])
    if bool(config.get("int8-updates", False)):
        encoded = encode_int8_delta(updated, from_arrayrecord(msg.content["arrays"]))
    else:
        encoded = to_arrayrecord(updated, fp16=bool(config.get("fp16-transport", False)))
    reply.content["arrays"] = encoded
    return reply
