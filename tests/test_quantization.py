"""int8 updates: the codec's error bound, the bytes they save, and the wire mod of the train handler."""

import time
import uuid

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from client.update_encoding import update_encoding_mod
from common.quantization import (
    SCALES_KEY,
    VALUES_KEY,
    decode_int8_delta,
    decode_update,
    dequantize_int8,
    encode_int8_delta,
    quantize_int8,
)
from common.stunet import build_stunet
from common.weights import flatten, from_arrayrecord, record_nbytes, to_arrayrecord, update_problems


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.conv.weight": rng.normal(0, 0.1, (8, 4, 3, 3, 3)).astype(np.float32),
            "a.norm1.weight": np.ones(8, np.float32), "b.conv.weight": rng.normal(0, 0.1, (8, 4, 3, 3, 3)).astype(np.float32),
            "b.empty": np.zeros((0,), np.float32)}


def test_int8_round_trip_error_is_at_most_half_a_step_per_tensor():
    rng = np.random.default_rng(1)
    for delta in (rng.normal(0, 1e-3, 5000), rng.uniform(-3, 3, (7, 11)), np.array([1e-30, -2e-30, 0.0]),
                  rng.standard_cauchy(1000)):
        delta = delta.astype(np.float32)
        q, scale = quantize_int8(delta)
        assert q.dtype == np.int8 and q.shape == delta.shape and np.abs(q).max() == 127
        assert scale == np.float32(np.abs(delta).max() / 127)
        error = np.abs(dequantize_int8(q, scale) - delta)
        assert error.max() <= 0.5 * scale * (1 + 1e-4)
    zeros, scale = quantize_int8(np.zeros(4, np.float32))
    assert scale == 0 and not zeros.any()


def test_encode_decode_against_the_received_model():
    received = _model(0)
    trained = {k: v + np.random.default_rng(2).normal(0, 1e-3, v.shape).astype(np.float32) for k, v in received.items()}
    record = encode_int8_delta(trained, received)
    assert set(record.keys()) == {VALUES_KEY, SCALES_KEY}
    assert record[VALUES_KEY].dtype == "int8" and record[SCALES_KEY].dtype == "float32"
    decoded = decode_update(record, received)
    assert list(decoded) == list(received) and all(decoded[k].dtype == np.float32 for k in decoded)
    for key in received:
        if received[key].size:
            step = np.abs(trained[key] - received[key]).max() / 127
            assert np.abs(decoded[key] - trained[key]).max() <= 0.5 * step * (1 + 1e-4) + 1e-7
    # float records decode as before
    assert np.array_equal(decode_update(to_arrayrecord(trained), received)["a.conv.weight"], trained["a.conv.weight"])


def test_a_bad_int8_record_is_one_clear_error():
    received = _model()
    record = encode_int8_delta(received, received)
    short = ArrayRecord({VALUES_KEY: Array(record[VALUES_KEY].numpy()[:-3]), SCALES_KEY: record[SCALES_KEY]})
    with pytest.raises(ValueError, match=r"int8 update: \d+ int8 values for a model of \d+ weights"):
        decode_int8_delta(short, received)
    with pytest.raises(ValueError, match="keys differ"):
        encode_int8_delta({"a.conv.weight": received["a.conv.weight"]}, received)


def test_non_finite_update_is_sent_as_nan_and_screened_out():
    received = _model()
    broken = dict(received, **{"a.conv.weight": np.full_like(received["a.conv.weight"], np.inf)})
    decoded = decode_update(encode_int8_delta(broken, received), received)
    assert any("NaN or Inf" in p for p in update_problems(decoded, received))


def test_int8_update_of_the_stunet_pair_is_at_most_a_quarter_of_fp32():
    from simulations.benchmarks.bench_transport import wire_bytes

    torch.manual_seed(0)
    pair = flatten({name: build_stunet("T", num_classes=2, base_width=4).state_dict() for name in ("a", "b")})
    trained = {k: v + np.float32(1e-3) for k, v in pair.items()}
    fp32, int8 = to_arrayrecord(trained), encode_int8_delta(trained, pair)
    assert record_nbytes(int8) <= 0.25 * record_nbytes(fp32)
    metrics = MetricRecord({"num-labeled": 1.0})
    fp32_wire, _ = wire_bytes(RecordDict({"arrays": fp32, "metrics": metrics}))
    int8_wire, _ = wire_bytes(RecordDict({"arrays": int8, "metrics": metrics}))
    assert int8_wire <= 0.25 * fp32_wire


def _request(config: dict, arrays: dict) -> Message:
    metadata = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    content = RecordDict({"arrays": to_arrayrecord(arrays, fp16=bool(config.get("fp16-transport"))), "config": ConfigRecord(config)})
    return Message(content=content, metadata=metadata)


@pytest.mark.parametrize("config, dtype", [({}, "float32"), ({"fp16-transport": True}, "float16"),
                                           ({"int8-updates": True}, "int8"), ({"int8-updates": True, "fp16-transport": True}, "int8")])
def test_the_train_handler_reply_goes_on_the_wire_as_configured(config, dtype):
    model = _model()
    request = _request(config, model)
    received = from_arrayrecord(request.content["arrays"])
    trained = {k: v + np.float32(0.01) for k, v in received.items()}

    def handler(msg: Message, ctxt: Context) -> Message:
        return Message(RecordDict({"arrays": to_arrayrecord(trained), "metrics": MetricRecord({"num-labeled": 1.0})}),
                       reply_to=msg)

    reply = update_encoding_mod(request, Context(1, 1, {}, RecordDict(), {}), handler)
    arrays = reply.content["arrays"]
    assert next(iter(arrays.values())).dtype == dtype
    # The server decodes against what it sent (the fp16 rounding of its model, with fp16 transport).
    decoded = decode_update(arrays, decode_update(to_arrayrecord(model, fp16=bool(config.get("fp16-transport"))), model))
    for key in model:
        atol = {"float32": 0.0, "float16": 2e-3, "int8": 0.01 / 254 + 1e-6}[dtype]  # int8: half a step
        np.testing.assert_allclose(decoded[key], trained[key], rtol=0, atol=atol)
