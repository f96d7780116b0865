"""Simulation-only harness: the NdpUnit with its memory and a result sink inside the design.

Python that touches signals every cycle is what makes a cocotb bench slow, so the harness lets
whole descriptors run without it:

- a memory model: requests queue up, a read engine streams their words out of a RAM (loaded by
  the bench through VPI before the run) into a response FIFO, with LFSR-driven random stalls on
  the request handshake, the response handshake and the read engine (random latency);
- a result sink: results land in a RAM (read back through VPI after the descriptor), with LFSR
  random back-pressure on the output stream.

- handshake wait counters for the bench's coverage: cycles a descriptor waited on the command
  port, a memory request waited on the memory, a response word waited on the unit (each valid
  and not ready at the unit's own port, whichever model drives the other side).

`ext_mem` / `ext_out` switch the unit's memory ports / output stream to the harness's own ports
instead, so the same build also serves a bench whose memory model and output consumer are
Python coroutines. Stall rates are n/16 per cycle (0: never, 15: almost always).

The RAMs are a tiny behavioural Verilog module (`SIM_RAM_VERILOG`) instantiated as a black box:
an Amaranth Memory would be written out with an initial value for every word, megabytes of
Verilog. With `storage="amaranth"` they are Amaranth Memories instead (small sizes only), so
the harness also runs in amaranth.sim.
"""
from __future__ import annotations

from amaranth.hdl import ClockSignal, Instance, Module, Mux, Signal, unsigned
from amaranth.lib import fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import NdpConfig

from .geometry import bits_for, log2
from .mem_reader import mem_request_layout
from .ndp_unit import NdpUnit
from .shapes import CountersLayout, DescriptorLayout, StatusLayout, result_layout

SIM_RAM_VERILOG = """\
// Simulation-only RAM of the ndpmoe sim harness: no initial values (loaded through VPI).
module ndp_sim_ram #(parameter WIDTH = 128, parameter ADDR_BITS = 16) (
    input wire clk,
    input wire [ADDR_BITS-1:0] raddr,
    output reg [WIDTH-1:0] rdata,
    input wire we,
    input wire [ADDR_BITS-1:0] waddr,
    input wire [WIDTH-1:0] wdata
);
    reg [WIDTH-1:0] mem [0:(1 << ADDR_BITS) - 1];
    always @(posedge clk) begin
        if (we) mem[waddr] <= wdata;
        rdata <= mem[raddr];
    end
endmodule
"""

WAITS = ("cmd", "req", "resp")     # handshakes whose waits the harness counts

# Galois LFSR taps (maximal length) per width.
_LFSR_TAPS = {16: 0xB400, 20: 0x90000, 24: 0xE10000}


class Lfsr(wiring.Component):
    """A free-running maximal-length Galois LFSR; `stall` is high with probability `rate`/16."""

    def __init__(self, width: int, seed: int):
        if width not in _LFSR_TAPS:
            raise ValueError(f"LFSR width must be one of {sorted(_LFSR_TAPS)}, not {width!r}")
        if not 0 < seed < (1 << width):
            raise ValueError(f"seed must be in [1, 2^{width}), not {seed!r}")
        self._width, self._seed = width, seed
        super().__init__({"rate": In(4), "stall": Out(1)})

    def elaborate(self, platform):
        m = Module()
        state = Signal(self._width, init=self._seed)
        step = Mux(state[0], (state >> 1) ^ _LFSR_TAPS[self._width], state >> 1)
        m.d.sync += state.eq(step)
        m.d.comb += self.stall.eq(state[self._width - 4:] < self.rate)
        return m


class SimRam(wiring.Component):
    """One read port (registered) and one write port over `depth` words."""

    def __init__(self, width: int, addr_bits: int, storage: str):
        if storage not in ("instance", "amaranth"):
            raise ValueError(f"storage must be 'instance' or 'amaranth', not {storage!r}")
        self._width, self._addr_bits, self._storage = width, addr_bits, storage
        # amaranth.sim benches reach the words through `memory.data`.
        self.memory = (memory.Memory(shape=width, depth=1 << addr_bits, init=[])
                       if storage == "amaranth" else None)
        super().__init__({
            "raddr": In(addr_bits), "rdata": Out(width),
            "we": In(1), "waddr": In(addr_bits), "wdata": In(width),
        })

    def elaborate(self, platform):
        m = Module()
        if self._storage == "instance":
            m.submodules.ram = Instance(
                "ndp_sim_ram", p_WIDTH=self._width, p_ADDR_BITS=self._addr_bits,
                i_clk=ClockSignal("sync"), i_raddr=self.raddr, o_rdata=self.rdata,
                i_we=self.we, i_waddr=self.waddr, i_wdata=self.wdata)
        else:
            m.submodules.ram = ram = self.memory
            rp, wp = ram.read_port(), ram.write_port()
            m.d.comb += [rp.addr.eq(self.raddr), self.rdata.eq(rp.data), wp.addr.eq(self.waddr),
                         wp.data.eq(self.wdata), wp.en.eq(self.we)]
        return m


class SimHarness(wiring.Component):
    """NdpUnit + memory model + result sink. See the module docstring.

    Ports: `cmd`; `ext_mem`, `mem_req`, `mem_resp`; `ext_out`, `out`; `req_stall`, `resp_stall`,
    `read_stall`, `out_stall` (rates n/16); `status`, `counters`, `done`; `result_count` (results
    in the result RAM), `result_clear`; `cmd_waits`, `req_waits`, `resp_waits`. The memory is
    `mem_words` words at byte address 0 .. mem_words * P/8 (higher addresses wrap); the result RAM
    holds `result_words` results.
    """

    def __init__(self, cfg: NdpConfig, *, mem_words: int = 1 << 16, result_words: int = 1 << 14,
                 storage: str = "instance", **unit_args):
        for name, value in (("mem_words", mem_words), ("result_words", result_words)):
            if not isinstance(value, int) or value < 2 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 2, not {value!r}")
        self._cfg = cfg
        self._mem_words, self._result_words, self._storage = mem_words, result_words, storage
        self.unit = NdpUnit(cfg, **unit_args)
        self.storage = SimRam(cfg.word_bits, log2(mem_words), storage)
        self.results = SimRam(result_layout(cfg.t_max).size, log2(result_words), storage)
        req_layout = mem_request_layout(cfg.addr_bits, self.unit.max_burst)
        super().__init__({
            "cmd": In(stream.Signature(DescriptorLayout)),
            "ext_mem": In(1),
            "mem_req": Out(stream.Signature(req_layout)),
            "mem_resp": In(stream.Signature(unsigned(cfg.word_bits))),
            "ext_out": In(1),
            "out": Out(stream.Signature(result_layout(cfg.t_max))),
            "req_stall": In(4), "resp_stall": In(4), "read_stall": In(4), "out_stall": In(4),
            "status": Out(StatusLayout),
            "counters": Out(CountersLayout),
            "done": Out(1),
            "result_count": Out(32),
            "result_clear": In(1),
            **{f"{name}_waits": Out(32) for name in WAITS},
        })

    @property
    def mem_words(self) -> int:
        return self._mem_words

    @property
    def result_words(self) -> int:
        return self._result_words

    def elaborate(self, platform):
        m = Module()
        cfg, unit = self._cfg, self.unit
        m.submodules.unit = unit
        wiring.connect(m, wiring.flipped(self.cmd), unit.cmd)
        m.d.comb += [self.status.eq(unit.status), self.counters.eq(unit.counters), self.done.eq(unit.done)]

        lfsrs = {}
        for i, (name, rate) in enumerate((("req", self.req_stall), ("resp", self.resp_stall),
                                          ("read", self.read_stall), ("out", self.out_stall))):
            m.submodules[f"lfsr_{name}"] = lfsr = Lfsr(24 if i % 2 else 20, 0x1ACE5 + 7919 * i)
            m.d.comb += lfsr.rate.eq(rate)
            lfsrs[name] = lfsr.stall

        # -- memory model ------------------------------------------------------------------------
        addr_bits = log2(self._mem_words)
        m.submodules.storage = storage = self.storage
        req_layout = mem_request_layout(cfg.addr_bits, unit.max_burst)
        m.submodules.requests = requests = fifo.SyncFIFOBuffered(width=req_layout.size, depth=4)
        m.submodules.responses = responses = fifo.SyncFIFOBuffered(width=cfg.word_bits, depth=8)

        req_valid = Mux(self.ext_mem, 0, unit.mem_req.valid)
        m.d.comb += [
            requests.w_data.eq(unit.mem_req.payload),
            requests.w_en.eq(req_valid & ~lfsrs["req"] & requests.w_rdy),
            self.mem_req.payload.eq(unit.mem_req.payload),
            self.mem_req.valid.eq(unit.mem_req.valid & self.ext_mem),
            unit.mem_req.ready.eq(Mux(self.ext_mem, self.mem_req.ready, ~lfsrs["req"] & requests.w_rdy)),
        ]

        # Read engine: one request at a time, one word per cycle unless stalled or the FIFO is
        # full (counting the word still in the RAM's read register).
        head = req_layout(requests.r_data)
        word_addr = Signal(addr_bits)
        left = Signal(bits_for(unit.max_burst))
        in_flight = Signal()
        room = responses.level + in_flight < responses.depth - 1
        read = (left != 0) & room & ~lfsrs["read"]
        m.d.comb += storage.raddr.eq(word_addr)
        m.d.sync += in_flight.eq(read)
        with m.If(read):
            m.d.sync += [word_addr.eq(word_addr + 1), left.eq(left - 1)]
        # The next request is taken as the last word of the current one is read: no bubble.
        with m.If(requests.r_rdy & ((left == 0) | (read & (left == 1)))):
            m.d.comb += requests.r_en.eq(1)
            m.d.sync += [word_addr.eq(head.addr >> log2(cfg.word_bytes)), left.eq(head.words)]
        m.d.comb += [responses.w_data.eq(storage.rdata), responses.w_en.eq(in_flight)]

        resp_valid = responses.r_rdy & ~lfsrs["resp"]
        m.d.comb += [
            unit.mem_resp.valid.eq(Mux(self.ext_mem, self.mem_resp.valid, resp_valid)),
            unit.mem_resp.payload.eq(Mux(self.ext_mem, self.mem_resp.payload, responses.r_data)),
            self.mem_resp.ready.eq(unit.mem_resp.ready & self.ext_mem),
            responses.r_en.eq(resp_valid & unit.mem_resp.ready & ~self.ext_mem),
        ]

        # -- result sink ---------------------------------------------------------------------------
        layout = result_layout(cfg.t_max)
        m.submodules.results = results = self.results
        sink_ready = ~lfsrs["out"]
        m.d.comb += [
            self.out.payload.eq(unit.out.payload),
            self.out.valid.eq(unit.out.valid & self.ext_out),
            unit.out.ready.eq(Mux(self.ext_out, self.out.ready, sink_ready)),
            results.waddr.eq(self.result_count),
            results.wdata.eq(unit.out.payload),
            results.we.eq(unit.out.valid & sink_ready & ~self.ext_out),
        ]
        for name, port in (("cmd", unit.cmd), ("req", unit.mem_req), ("resp", unit.mem_resp)):
            counter = getattr(self, f"{name}_waits")
            with m.If(port.valid & ~port.ready):
                m.d.sync += counter.eq(counter + 1)
        with m.If(self.result_clear):
            m.d.sync += self.result_count.eq(0)
        with m.Elif(results.we):
            m.d.sync += self.result_count.eq(self.result_count + 1)
        return m
