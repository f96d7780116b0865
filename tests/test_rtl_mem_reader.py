"""MemReader: one command -> bursts of at most max_burst words, responses passed through."""
import random

from ndpmoe.rtl.mem_reader import MemReader

from rtl_sim import run, stream_put


def test_bursts_addresses_and_pass_through():
    dut = MemReader(word_bits=64, addr_bits=32, length_bits=16, max_burst=16)
    rng = random.Random(5)
    requests, received = [], []

    async def memory(ctx):
        """Takes requests at random and answers them in order with the word index."""
        pending = []
        sent = 0
        while True:
            ctx.set(dut.mem_req.ready, rng.random() < 0.6)
            resp_valid = bool(pending) and rng.random() < 0.7
            ctx.set(dut.mem_resp.valid, resp_valid)
            ctx.set(dut.mem_resp.payload, sent)
            _, _, req_v, req_r, req, resp_r = await ctx.tick().sample(
                dut.mem_req.valid, dut.mem_req.ready, dut.mem_req.payload, dut.mem_resp.ready)
            if req_v and req_r:
                requests.append((req.addr, req.words))
                pending += [req.words]
            if resp_valid and resp_r:
                sent += 1
                pending[0] -= 1
                if pending[0] == 0:
                    pending.pop(0)

    async def consumer(ctx):
        while len(received) < 40:
            ctx.set(dut.data.ready, rng.random() < 0.8)
            _, _, v, r, p, waiting = await ctx.tick().sample(dut.data.valid, dut.data.ready, dut.data.payload,
                                                             dut.waiting)
            if v and r:
                received.append(p)

    async def tb(ctx):
        assert not ctx.get(dut.busy)
        await stream_put(ctx, dut.cmd, {"addr": 0x1000, "words": 40})
        assert ctx.get(dut.busy) and not ctx.get(dut.cmd.ready)
        while len(received) < 40:
            await ctx.tick()
        await ctx.tick()
        assert not ctx.get(dut.busy) and not ctx.get(dut.waiting)
        assert requests == [(0x1000, 16), (0x1000 + 16 * 8, 16), (0x1000 + 32 * 8, 8)]
        assert received == list(range(40))

    run(dut, tb, consumer, processes=[memory])
