"""The PTX table decode of kernels/nf4_decode.py, run by a small emulator of the five instructions it uses.

Property: for any 32-bit word of codes, the 8 values the PTX leaves in $0..$7 are exactly the fp32 table values
t[c] = lut[c] / 2 + 3 (rounded to 2**-14) of its 8 nibbles in the order [1, 0, 3, 2, 5, 4, 7, 6], and every t
lies within 2**-15 of the exact lut[c] / 2 + 3 (so the decoded weight 2 * (t - 3) is lut[c] to 2**-14).
Reference: qlora_core.formats.code_table (float64 math). The GPU test checks the compiled PTX against the
table path bit for bit (tests/test_gpu_nf4_linear.py).
"""
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qlora_core.formats import code_table
from qlora_core.kernels import nf4_decode

MASK = 0xFFFFFFFF


def run_ptx(asm: str, word: int, quant_type: str) -> list[float]:
    b2, b1 = nf4_decode.byte_tables(code_table(quant_type))
    regs = {"$8": word & MASK, **{f"${9 + i}": v for i, v in enumerate(b2 + b1)}}

    def val(o):
        return regs[o] if o in regs else int(o, 0)

    for line in asm.splitlines():
        line = line.split("//")[0].strip()
        if not line or line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.rstrip(";").split(None, 1)
        ops = [o.strip() for o in rest.split(",")]
        a = [val(o) for o in ops[1:]]
        if op == "mov.b32":
            r = a[0]
        elif op == "shr.u32":
            r = a[0] >> a[1]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "prmt.b32":  # default mode: selector nibble i picks byte i from {b, a}; bit 3 = sign mode
            src, r = a[0] | (a[1] << 32), 0
            for i in range(4):
                sel = (a[2] >> (4 * i)) & 0xF
                assert sel < 8, f"sign-replicate selector {sel:#x} in {line!r}"
                r |= ((src >> (8 * sel)) & 0xFF) << (8 * i)
        else:
            raise AssertionError(f"emulator does not know {op!r}")
        regs[ops[0]] = r & MASK
    return [struct.unpack("<f", struct.pack("<I", regs[f"${i}"]))[0] for i in range(8)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_table_values_are_close_to_the_code_table(quant_type):
    lut = code_table(quant_type, "cpu").double()
    t = torch.tensor(nf4_decode.t_values(code_table(quant_type)), dtype=torch.float64)
    assert torch.equal(t.float().double(), t), "t not exact in fp32"
    assert (t - (lut / 2 + 3)).abs().max() <= 2.0 ** -15
    assert ((t >= 2) & (t < 4)).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_code_in_every_slot(quant_type):
    asm, t = nf4_decode._decode_asm(), nf4_decode.t_values(code_table(quant_type))
    for c in range(16):
        for slot in range(8):
            word = c << (4 * slot) | (15 - c) << (4 * ((slot + 1) % 8))
            nib = [(word >> (4 * i)) & 0xF for i in range(8)]
            assert run_ptx(asm, word, quant_type) == [t[v] for v in nib], (quant_type, c, slot)


@settings(max_examples=300, deadline=None)
@given(word=st.integers(0, MASK), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_random_words(word, quant_type):
    t = nf4_decode.t_values(code_table(quant_type))
    assert run_ptx(nf4_decode._decode_asm(), word, quant_type) == [t[(word >> (4 * i)) & 0xF] for i in range(8)]


def test_word_layout_matches_bitsandbytes_packing():
    """Nibble i of a little-endian word is column [1, 0, 3, 2, 5, 4, 7, 6][i] of the word's 8 columns."""
    from qlora_core.ops import quant4
    codes = torch.arange(8, dtype=torch.uint8)
    packed = quant4.pack_nibbles(codes, "nf4")
    word = int.from_bytes(bytes(packed.reshape(-1).tolist()), "little")
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [1, 0, 3, 2, 5, 4, 7, 6]
