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
        await ctx.tick().repeat(3)                  # `waiting` is three cycles late
        assert not ctx.get(dut.busy) and not ctx.get(dut.waiting)
        assert requests == [(0x1000, 16), (0x1000 + 16 * 8, 16), (0x1000 + 32 * 8, 8)]
        assert received == list(range(40))

    run(dut, tb, consumer, processes=[memory])


def test_next_command_overlaps_and_words_carry_their_slot():
    """The second command is taken once the first's requests are out, while its words still
    arrive; every word's `word_slot` (a cycle after its handshake) names its own command."""
    dut = MemReader(word_bits=64, addr_bits=32, length_bits=16, max_burst=8)
    rng = random.Random(8)
    commands = [(0x100, 19, 0), (0x800, 5, 1), (0x1000, 12, 0)]
    requests, slots = [], []
    taken_at, first_word_at = [], []
    cycle = [0]

    async def memory(ctx):
        pending = []
        while True:
            ctx.set(dut.mem_req.ready, rng.random() < 0.8)
            resp_valid = bool(pending) and rng.random() < 0.6      # the memory is slower than the reader
            ctx.set(dut.mem_resp.valid, resp_valid)
            _, _, req_v, req_r, req, resp_r, fire, slot = await ctx.tick().sample(
                dut.mem_req.valid, dut.mem_req.ready, dut.mem_req.payload, dut.mem_resp.ready,
                dut.word_fire, dut.word_slot)
            cycle[0] += 1
            if fire:
                slots.append(slot)
            if req_v and req_r:
                requests.append((req.addr, req.words))
                pending.append(req.words)
            if resp_valid and resp_r:
                pending[0] -= 1
                if pending[0] == 0:
                    pending.pop(0)

    async def tb(ctx):
        ctx.set(dut.data.ready, 1)
        for addr, words, slot in commands:
            await stream_put(ctx, dut.cmd, {"addr": addr, "words": words, "slot": slot})
            taken_at.append(cycle[0])
        while len(slots) < sum(c[1] for c in commands):
            await ctx.tick()
        assert slots == [s for _, n, s in commands for _ in range(n)]
        assert requests == [(0x100, 8), (0x140, 8), (0x180, 3), (0x800, 5), (0x1000, 8), (0x1040, 4)]
        # the second command was taken before the first's last word arrived
        assert taken_at[1] < cycle_of_word[19 - 1]

    cycle_of_word = []

    async def words_seen(ctx):
        while True:
            _, _, v, r = await ctx.tick().sample(dut.data.valid, dut.data.ready)
            if v and r:
                cycle_of_word.append(cycle[0])

    run(dut, tb, processes=[memory, words_seen])
