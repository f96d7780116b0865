"""Memory read port: linear read commands -> bursts on the memory request stream.

The memory side is two streams with valid/ready and any latency in between: requests
(byte address, words) and response words of P bits, in request order. The unit reads each
descriptor's data as one linear range; this component cuts it into bursts of at most
`max_burst` words (an AXI-style limit), issues them one every other cycle at most (a burst
carries many words, so that is no limit on bandwidth), and passes the response words through
untouched (no added latency, no buffering; the unit puts a ResponseFifo behind it,
rtl/response_fifo.py).

Two commands can be in flight: the next one's requests go out as soon as the current one's have
all gone out, while its words are still arriving, so the memory never idles between descriptors.
Each command carries a `slot` (which of the unit's descriptors it reads for); `word_fire` /
`word_slot` say, a cycle after each response handshake, whose word it was.
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .geometry import bits_for, log2


def mem_request_layout(addr_bits: int, max_burst: int) -> data.StructLayout:
    """A memory request: byte address (word aligned) and a word count 1..max_burst."""
    return data.StructLayout({"addr": unsigned(addr_bits), "words": unsigned(bits_for(max_burst))})


def read_command_layout(addr_bits: int, length_bits: int, slot_bits: int = 1) -> data.StructLayout:
    return data.StructLayout({"addr": unsigned(addr_bits), "words": unsigned(length_bits),
                              "slot": unsigned(slot_bits)})


class MemReader(wiring.Component):
    """Request generator and response pass-through.

    Ports: `cmd` (In stream: addr, words, slot; taken when the previous command's requests have
    all gone out and at most one command still receives), `mem_req` / `mem_resp` (the memory),
    `data` (Out stream: the response words, combinationally), `busy` (requests left to issue or
    words still to arrive), `waiting` (words requested and not yet arrived, three cycles late),
    `word_fire` (a response word was taken a cycle ago), `word_slot` (its command's slot).
    """

    def __init__(self, *, word_bits: int, addr_bits: int, length_bits: int, max_burst: int = 256,
                 slot_bits: int = 1):
        for name, value in (("word_bits", word_bits), ("addr_bits", addr_bits), ("length_bits", length_bits),
                            ("slot_bits", slot_bits)):
            if not isinstance(value, int) or value <= 0:
                raise TypeError(f"{name} must be a positive integer, not {value!r}")
        if not isinstance(max_burst, int) or max_burst <= 0 or max_burst & (max_burst - 1):
            raise ValueError(f"max_burst must be a positive power of two, not {max_burst!r}")
        self._word_bits = word_bits
        self._max_burst = max_burst
        self._length_bits = length_bits
        super().__init__({
            "cmd": In(stream.Signature(read_command_layout(addr_bits, length_bits, slot_bits))),
            "mem_req": Out(stream.Signature(mem_request_layout(addr_bits, max_burst))),
            "mem_resp": In(stream.Signature(unsigned(word_bits))),
            "data": Out(stream.Signature(unsigned(word_bits))),
            "busy": Out(1),
            "waiting": Out(1),
            "word_fire": Out(1),
            "word_slot": Out(slot_bits),
        })

    @property
    def max_burst(self) -> int:
        return self._max_burst

    def elaborate(self, platform):
        m = Module()
        word_bytes = self._word_bits // 8
        mb_log = log2(self._max_burst)
        addr = Signal.like(self.mem_req.payload.addr)
        # Every burst but the last is max_burst words, so the next request's address is the
        # current one plus a constant: it is worked out ahead (`addr_next`, its upper bits; the
        # lower stay), and the handshake only moves it over (no adder behind the memory's ready).
        step_log = mb_log + log2(word_bytes)
        addr_next = Signal(max(1, len(addr) - step_log))
        # The request side runs from registers (valid, burst length), so nothing the memory's
        # ready or response touches passes through a wide compare: a read of W words is
        # `full_left` more bursts of max_burst words after the current one, then `last_burst`.
        req_valid = Signal()
        burst = Signal.like(self.mem_req.payload.words)
        full_left = Signal(max(1, self._length_bits - mb_log))
        last_burst = Signal.like(burst)
        requesting = Signal()                       # a command whose requests have not all gone out
        # Receive side: the command whose words arrive now (`cur`) and the one after it (`nxt`).
        cur_valid, cur_left, cur_slot = Signal(), Signal(self._length_bits), Signal.like(self.cmd.payload.slot)
        nxt_valid, nxt_words, nxt_slot = Signal(), Signal(self._length_bits), Signal.like(self.cmd.payload.slot)
        nxt_one = Signal()                          # nxt_words == 1
        # `one_left` (cur_left == 1) kept as a flag: no wide compare behind the response handshake
        one_left = Signal()
        outstanding = Signal(self._length_bits + 1)     # words requested and not yet arrived
        waiting = Signal()
        resp_fire = Signal()
        # A command is taken into registers first; its bursts are worked out over the two cycles
        # after (words - 1 and the compares in the first, the burst registers in the second).
        pending = Signal()
        pending2 = Signal()
        words = Signal(self._length_bits)
        slot = Signal.like(self.cmd.payload.slot)

        m.d.comb += [
            self.mem_req.valid.eq(req_valid),
            self.mem_req.payload.addr.eq(addr),
            self.mem_req.payload.words.eq(burst),
            self.cmd.ready.eq(~requesting & ~nxt_valid),
            self.busy.eq(requesting | cur_valid),
            self.waiting.eq(waiting),
            self.word_fire.eq(resp_fire),
            self.word_slot.eq(cur_slot),
            # Responses pass straight through: the consumer's ready is the memory's ready.
            self.data.valid.eq(self.mem_resp.valid),
            self.data.payload.eq(self.mem_resp.payload),
            self.mem_resp.ready.eq(self.data.ready),
        ]
        words_m1 = Signal(self._length_bits)
        words_nz = Signal()
        words_big = Signal()
        m.d.sync += [pending.eq(0), pending2.eq(pending)]
        with m.If(pending):
            m.d.sync += [words_m1.eq(words - 1), words_nz.eq(words != 0), words_big.eq(words > self._max_burst),
                         addr_next.eq(addr[step_log:] + 1)]
        # `full_left` == 0 / == 1 kept as flags (full_left counts down by one per burst)
        fl_zero = Signal()
        fl_one = Signal()
        with m.If(pending2):
            full = words_m1 >> mb_log
            m.d.sync += [
                req_valid.eq(words_nz),
                requesting.eq(words_nz),
                burst.eq(Mux(words_big, self._max_burst, words)),
                full_left.eq(full),
                fl_zero.eq(full == 0),
                fl_one.eq(full == 1),
                last_burst.eq((words_m1 & (self._max_burst - 1)) + 1),
            ]
        # The memory's ready (from outside the unit) reaches two flip-flops: valid drops for a
        # cycle after every accepted request, and the next request is set up in that cycle from
        # the registered handshake. Bursts are up to max_burst words, so a request every other
        # cycle costs no bandwidth. The request handshake and a new command never meet (a
        # command is taken only when no request is left, and then none is valid).
        req_fire = Signal()
        m.d.sync += req_fire.eq(self.mem_req.valid & self.mem_req.ready)
        with m.If(self.mem_req.valid & self.mem_req.ready):
            m.d.sync += req_valid.eq(0)
        with m.If(req_fire):
            m.d.sync += [
                addr[step_log:].eq(addr_next),
                addr_next.eq(addr_next + 1),
            ]
            with m.If(~fl_zero):
                m.d.sync += [req_valid.eq(1), full_left.eq(full_left - 1), fl_zero.eq(fl_one),
                             fl_one.eq(full_left == 2), burst.eq(Mux(fl_one, last_burst, self._max_burst))]
            with m.Else():
                m.d.sync += requesting.eq(0)
        # Responses are counted a cycle after their handshake (the memory's handshake sits at
        # the unit's edge, the counters beside the controller). A fired burst counts as
        # requested a cycle after its handshake too.
        # (the change of `outstanding` is worked out a cycle ahead: one adder, not two, per cycle)
        change = Signal(signed(len(burst) + 1))
        m.d.sync += [
            resp_fire.eq(self.mem_resp.valid & self.mem_resp.ready & cur_valid),
            change.eq(Mux(req_fire, burst, 0) - resp_fire),
            outstanding.eq(outstanding + change),
            waiting.eq(outstanding != 0),
        ]
        with m.If(resp_fire):
            m.d.sync += [cur_left.eq(cur_left - 1), one_left.eq(cur_left == 2)]
            with m.If(one_left):                    # cur's last word: the next command receives
                m.d.sync += [cur_valid.eq(nxt_valid), cur_left.eq(nxt_words), cur_slot.eq(nxt_slot),
                             one_left.eq(nxt_one), nxt_valid.eq(0)]
        # A command enters the receive side in `pending` (no request goes out before pending2,
        # so no word of it arrives before it is there).
        # (whether the command reads any word, or one, registered with it: no wide compare here)
        words_any, words_one = Signal(), Signal()
        with m.If(pending & words_any):
            with m.If(~cur_valid | (resp_fire & one_left & ~nxt_valid)):
                m.d.sync += [cur_valid.eq(1), cur_left.eq(words), cur_slot.eq(slot), one_left.eq(words_one)]
            with m.Else():
                m.d.sync += [nxt_valid.eq(1), nxt_words.eq(words), nxt_slot.eq(slot), nxt_one.eq(words_one)]
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [
                addr.eq(self.cmd.payload.addr),
                words.eq(self.cmd.payload.words),
                words_any.eq(self.cmd.payload.words != 0),
                words_one.eq(self.cmd.payload.words == 1),
                slot.eq(self.cmd.payload.slot),
                pending.eq(1),
                # requesting from the command on; whether any word comes is settled in pending2
                requesting.eq(1),
            ]
        return m
