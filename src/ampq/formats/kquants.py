"""llama.cpp's K-quants as ampq formats: ``q2_k``, ``q3_k``, ``q4_k``, ``q5_k``, ``q6_k``.

A block is 256 inputs of one row, in sub-blocks of 16 or 32; stored as llama.cpp stores it
(ggml-common.h), so bytes per weight are exactly llama.cpp's:

=====  =========  =====================================================  ======  =========
type   sub-block  decoded weight                                         bytes   bits/wt
=====  =========  =====================================================  ======  =========
Q2_K   16         d * sc * q - dmin * m, q in 0..3, sc, m 4-bit          84      2.625
Q3_K   16         d * (sc - 32) * (q - 4), q in 0..7, sc 6-bit           110     3.4375
Q4_K   32         d * sc * q - dmin * m, q in 0..15, sc, m 6-bit         144     4.5
Q5_K   32         d * sc * q - dmin * m, q in 0..31, sc, m 6-bit         176     5.5
Q6_K   16         d * sc * (q - 32), q in 0..63, sc int8                 210     6.5625
=====  =========  =====================================================  ======  =========

with d and dmin fp16 per block. The parameters are searched as llama.cpp's ``quantize_row_*_impl``
search them (:mod:`.kquant_search`), each weight's error weighted by the importance of its input
(the mean of x^2 calibration saw there) where one is given, else by llama.cpp's weights without an
importance matrix.
"""

from __future__ import annotations

import torch

from ampq.formats.gguf_block import GgufBlockFormat, to_fp16
from ampq.formats.kquant_search import EPS, positive_levels, scale_and_min, signed_scale
from ampq.formats.packing import pack_fields, unpack_fields

QK_K = 256


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1)


def _sigma2(x: torch.Tensor, factor: float) -> torch.Tensor:
    return factor * (x * x).sum(1, keepdim=True) / QK_K


class KQuantFormat(GgufBlockFormat):
    block = QK_K
    # name -> (code bits, sub-block inputs, bytes per block, with a minimum)
    TYPES = {"q2_k": (2, 16, 84, True), "q3_k": (3, 16, 110, False), "q4_k": (4, 32, 144, True),
             "q5_k": (5, 32, 176, True), "q6_k": (6, 16, 210, False)}

    def __init__(self, name: str):
        super().__init__(name)
        self.bits, self.group_size, self.type_size, self.has_min = self.TYPES[name]
        self.nmax = (1 << self.bits) - 1 if self.has_min else 1 << (self.bits - 1)
        self.subs = QK_K // self.group_size

    # ---- search -----------------------------------------------------------------------------------
    def _weights(self, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        if self.name == "q6_k":  # llama.cpp weights Q6_K by the importance alone (its sigma2 term is commented out)
            return importance if importance is not None else x * x
        sigma2 = _sigma2(x, 1.0 if self.name == "q2_k" else 2.0)
        if importance is not None:
            return importance * torch.sqrt(sigma2 + x * x)
        if self.name == "q3_k":
            return x * x
        return x.abs() if self.name == "q2_k" else torch.sqrt(sigma2) + x.abs()

    def _search(self, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        n, gs = x.shape[0], self.group_size
        xs, ws = x.reshape(-1, gs), weights.reshape(-1, gs)
        sw = ws.sum(1).reshape(n, self.subs)
        if self.has_min:
            scale, m = scale_and_min(xs, ws, self.nmax)
            levels = 15 if self.name == "q2_k" else 63
            d, sc = positive_levels(scale.reshape(n, self.subs), sw, levels)
            dmin, lm = positive_levels(m.reshape(n, self.subs), sw, levels)
            return {"d": to_fp16(d, "d"), "dmin": to_fp16(dmin, "dmin"), "sc": sc.to(torch.uint8),
                    "m": lm.to(torch.uint8)}
        scale, _ = signed_scale(xs, ws, self.nmax)
        scale = scale.reshape(n, self.subs)
        if self.name == "q3_k":
            d, q = signed_scale(scale, sw, 32)
            return {"d": to_fp16(d, "d"), "sc": (q + 32).to(torch.uint8)}
        # Q6_K: the sub-block scale of largest magnitude becomes -128 (int8), as llama.cpp does
        peak = scale.gather(1, scale.abs().argmax(1, keepdim=True))[:, 0]
        zero = peak.abs() < EPS
        iscale = -128.0 / torch.where(zero, torch.ones_like(peak), peak)
        d = torch.where(zero, torch.zeros_like(peak), 1.0 / iscale)
        sc = torch.round(iscale[:, None] * scale).clamp_(-128, 127)
        return {"d": to_fp16(d, "d"), "sc": torch.where(zero[:, None], 0, sc).to(torch.int8)}

    def _values(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        d = parts["d"].float().reshape(-1, 1)
        if self.name == "q3_k":
            return {"scale": d * (parts["sc"].float() - 32)}
        scale = d * parts["sc"].float()
        if not self.has_min:
            return {"scale": scale}
        return {"scale": scale, "min": -(parts["dmin"].float().reshape(-1, 1) * parts["m"].float())}

    # ---- codes ------------------------------------------------------------------------------------
    def encode(self, w: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = values["scale"]
        live = scale != 0
        safe = torch.where(live, scale, torch.ones_like(scale))
        if self.has_min:  # llama.cpp divides: nearest_int((x + dm) / d)
            q = torch.round((w - values["min"]) / safe).clamp_(0, self.nmax)
        else:
            q = torch.round(w / safe).clamp_(-self.nmax, self.nmax - 1) + self.nmax
        return torch.where(live, q, torch.zeros_like(q)).to(torch.int32)

    def decode(self, codes: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.has_min:
            return codes.float() * values["scale"] + values["min"]
        return (codes - self.nmax).float() * values["scale"]

    # ---- blocks as ggml-common.h lays them out ----------------------------------------------------
    def _to_blocks(self, codes: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        c = codes.to(torch.int32)
        name = self.name
        if name in ("q4_k", "q5_k"):
            ls, lm = parts["sc"].to(torch.int32), parts["m"].to(torch.int32)
            scales = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                                (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1).to(torch.uint8)
            body = [pack_fields(c >> 4, 32, 1)] if name == "q5_k" else []
            return torch.cat([_f16_bytes(parts["d"]), _f16_bytes(parts["dmin"]), scales, *body,
                              pack_fields(c & 0xF, 32, 4)], dim=1)
        if name == "q6_k":
            return torch.cat([pack_fields(c & 0xF, 64, 4), pack_fields(c >> 4, 32, 2),
                              parts["sc"].view(torch.uint8), _f16_bytes(parts["d"])], dim=1)
        if name == "q2_k":
            scales = (parts["sc"].to(torch.int32) | (parts["m"].to(torch.int32) << 4)).to(torch.uint8)
            return torch.cat([scales, pack_fields(c, 32, 2), _f16_bytes(parts["d"]), _f16_bytes(parts["dmin"])], dim=1)
        sc = parts["sc"].to(torch.int32)  # q3_k
        return torch.cat([pack_fields(c >> 2, 32, 1), pack_fields(c & 3, 32, 2), pack_fields(sc & 0xF, 8, 4),
                          pack_fields(sc >> 4, 4, 2), _f16_bytes(parts["d"])], dim=1)

    def _from_blocks(self, b: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        name = self.name
        if name in ("q4_k", "q5_k"):
            d, dmin, s = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16].to(torch.int32)
            ls = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
            lm = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
            codes = unpack_fields(b[:, -128:], 32, 4)
            if name == "q5_k":
                codes = codes | (unpack_fields(b[:, 16:48], 32, 1) << 4)
            return codes, {"d": d, "dmin": dmin, "sc": ls.to(torch.uint8), "m": lm.to(torch.uint8)}
        if name == "q6_k":
            codes = unpack_fields(b[:, :128], 64, 4) | (unpack_fields(b[:, 128:192], 32, 2) << 4)
            return codes, {"d": _f16(b[:, 208:210]), "sc": b[:, 192:208].contiguous().view(torch.int8)}
        if name == "q2_k":
            s = b[:, :16].to(torch.int32)
            return unpack_fields(b[:, 16:80], 32, 2), {"d": _f16(b[:, 80:82]), "dmin": _f16(b[:, 82:84]),
                                                       "sc": (s & 0xF).to(torch.uint8), "m": (s >> 4).to(torch.uint8)}
        codes = unpack_fields(b[:, 32:96], 32, 2) | (unpack_fields(b[:, :32], 32, 1) << 2)  # q3_k
        sc = unpack_fields(b[:, 96:104], 8, 4) | (unpack_fields(b[:, 104:108], 4, 2) << 4)
        return codes, {"d": _f16(b[:, 108:110]), "sc": sc.to(torch.uint8)}
