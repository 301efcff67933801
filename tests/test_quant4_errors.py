"""Bad input gets an error that names the problem."""
import pytest
import torch

import qlora_core as qc
from qlora_core.ops.quant4 import QuantStateError


@pytest.mark.parametrize("bad,match", [(float("nan"), "NaN/Inf"), (float("inf"), "NaN/Inf"), (-float("inf"), "NaN/Inf")])
def test_non_finite_weights(bad, match):
    x = torch.randn(8, 8)
    x[3, 4] = bad
    with pytest.raises(ValueError, match=match):
        qc.quantize(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.bool])
def test_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        qc.quantize(torch.zeros(64, dtype=dtype))


@pytest.mark.parametrize("bs", [16, 8192, 48, 100, 0, -64, 64.0])
def test_bad_blocksize(bs):
    with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096"):
        qc.quantize(torch.randn(128), blocksize=bs)


def test_empty_and_unknown_type():
    with pytest.raises(ValueError, match="empty tensor"):
        qc.quantize(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="unknown quant_type 'int4'"):
        qc.quantize(torch.randn(64), quant_type="int4")
    with pytest.raises(TypeError, match="torch.Tensor"):
        qc.quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="QuantizedTensor"):
        qc.dequantize(torch.randn(3))


def sd_of(double_quant=True, quant_type="nf4"):
    return qc.quantize(torch.randn(40, 64), quant_type, 64, double_quant).state_dict("m.")


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map"])
def test_missing_key(key):
    sd = sd_of()
    del sd["m." + key]
    with pytest.raises(QuantStateError, match=f"'m.{key}'"):
        qc.QuantizedTensor.from_state_dict(sd, "m.")


def test_missing_or_duplicate_blob():
    sd = sd_of()
    blob = sd.pop("m.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(QuantStateError, match="exactly one key"):
        qc.QuantizedTensor.from_state_dict(sd, "m.")
    sd["m.weight.quant_state.bitsandbytes__nf4"] = blob
    sd["m.weight.quant_state.bitsandbytes__fp4"] = blob
    with pytest.raises(QuantStateError, match="exactly one key"):
        qc.QuantizedTensor.from_state_dict(sd, "m.")


def _with_blob(sd, text, key="m.weight.quant_state.bitsandbytes__nf4"):
    sd[key] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("text,match", [
    ('{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [41, 64], "nested_blocksize": 256, '
     '"nested_dtype": "float32", "nested_offset": 0.1}', r"'m.weight' is torch.uint8 \(1280, 1\)"),
    ('{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [40, 64]}', "JSON says 'fp4'"),
    ('{"quant_type": "nf4", "blocksize": 128, "dtype": "float32", "shape": [40, 64], "nested_offset": 0.1}',
     r"'m.weight.absmax' is torch.uint8 \(40,\)"),
    ('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [40, 64]}', "'m.weight.absmax' is torch.uint8"),
    ('{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [40, 64]}', "unsupported dtype 'int8'"),
    ('{"quant_type": "nf4", "blocksize": 100, "dtype": "float32", "shape": [40, 64]}', "power of two"),
    ('{"quant_type": "nf4", "dtype": "float32", "shape": [40, 64]}', "lacks the field 'blocksize'"),
    ('{"quant_type": "nf4", ', "not a UTF-8 JSON blob"),
])
def test_blob_disagrees_with_tensors(text, match):
    with pytest.raises(QuantStateError, match=match):
        qc.QuantizedTensor.from_state_dict(_with_blob(sd_of(), text), "m.")


def test_wrong_quant_map():
    sd = sd_of()
    sd["m.weight.quant_map"] = sd["m.weight.quant_map"] * 2
    with pytest.raises(QuantStateError, match="not the standard nf4 table"):
        qc.QuantizedTensor.from_state_dict(sd, "m.")
    sd = sd_of()
    sd["m.weight.nested_quant_map"] = torch.linspace(-1, 1, 256)
    with pytest.raises(QuantStateError, match="signed dynamic map"):
        qc.QuantizedTensor.from_state_dict(sd, "m.")


def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    from qlora_core import backend
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("QLORA_CORE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        qc.quantize(torch.randn(64))
    monkeypatch.setenv("QLORA_CORE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="QLORA_CORE_BACKEND='cuda-magic'"):
        backend.choose(torch.device("cpu"))


_GOOD = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [40, 64], "nested_blocksize": 256,
         "nested_dtype": "float32", "nested_offset": 0.1}


@pytest.mark.parametrize("field,value,match", [
    ("nested_offset", "abc", "nested_offset must be a finite number"),  # was a raw ValueError from float()
    ("nested_offset", float("nan"), "nested_offset must be a finite number"),  # was accepted
    ("nested_offset", 10 ** 400, "nested_offset must be a finite number"),  # float() would overflow
    ("nested_offset", None, "nested_offset must be a finite number"),
    ("shape", [-40, -64], "shape must be a non-empty list of positive ints"),  # was a raw RuntimeError
    ("shape", "40x64", "shape must be a non-empty list of positive ints"),
    ("shape", [], "shape must be a non-empty list of positive ints"),
    ("shape", [40.0, 64], "shape must be a non-empty list of positive ints"),
    ("dtype", ["float32"], "unsupported dtype"),
    ("blocksize", True, "power of two"),
    ("nested_blocksize", "256", "nested_blocksize '256' unsupported"),
    ("nested_dtype", "float16", "nested_dtype 'float16' unsupported"),
])
def test_every_malformed_blob_field_is_a_quant_state_error_naming_the_key(field, value, match):
    import json
    text = json.dumps({**_GOOD, field: value})
    with pytest.raises(QuantStateError, match=match) as e:
        qc.QuantizedTensor.from_state_dict(_with_blob(sd_of(), text), "m.")
    assert "m.weight.quant_state.bitsandbytes__nf4" in str(e.value)
    assert qc.QuantizedTensor.from_state_dict(_with_blob(sd_of(), json.dumps(_GOOD)), "m.").double_quant


def test_blob_that_is_not_an_object_or_names_an_unknown_type():
    with pytest.raises(QuantStateError, match="must hold a JSON object, got list"):
        qc.QuantizedTensor.from_state_dict(_with_blob(sd_of(), "[1, 2]"), "m.")
    sd = sd_of()
    sd["m.weight.quant_state.bitsandbytes__int4"] = sd.pop("m.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(QuantStateError, match="unknown quant type 'int4'"):
        qc.QuantizedTensor.from_state_dict(sd, "m.")
