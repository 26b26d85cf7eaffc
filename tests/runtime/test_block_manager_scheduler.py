"""Property and example tests of the paged-KV bookkeeping: `Scheduler` + `BlockManager`, no model.

The engine's step loop is simulated here: after `schedule()`, each scheduled request computes its
`n` tokens (and its full blocks are registered in the prefix cache); a request whose tokens are
all computed samples a fake token; a request with `max_tokens` outputs finishes.

Besides the bookkeeping invariants, a tiny model of the KV cache itself is kept: every slot a step
writes gets a value that depends on the whole token prefix up to that position (as a real KV entry
does), and before every step each scheduled request must see, through its block table, exactly the
values of its own prefix. This catches a prefix-cache hit on the wrong blocks, a write into a
block another request shares, and a block handed out while still in use.
"""

from __future__ import annotations

import random

from hypothesis import event, given, settings, target
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from kiln.runtime.block_manager import BlockManager
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler

VOCAB = 3  # small, so prompts and outputs share prefixes and the prefix cache gets hits
MAX_PROMPT = 60


def _blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _make_request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), max_tokens)


def _event(name: str) -> None:
    if currently_in_test_context():  # statistics for --hypothesis-show-statistics
        event(name)


def _prefix_keys(tokens: list[int]) -> list[int]:
    """What a KV entry at each position depends on: the whole prefix up to it."""
    keys, k = [], 0
    for t in tokens:
        k = hash((k, t))
        keys.append(k)
    return keys


class Sim:
    """The engine's step loop around a Scheduler, with invariant checks after every step."""

    def __init__(self, num_blocks, block_size, max_num_seqs, max_num_batched_tokens, prefix_caching, seed):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill=True)
        self.rng = random.Random(seed)
        self.all: list[Request] = []
        self.aborted: set[str] = set()
        self.kv: dict[int, list] = {b: [None] * block_size for b in range(num_blocks)}
        self.num_preemptions = 0
        self.num_prefix_hits = 0

    @property
    def live(self) -> list[Request]:
        return list(self.sched.running) + list(self.sched.waiting)

    def add(self, prompt: list[int], max_tokens: int) -> None:
        req = _make_request(f"r{len(self.all)}", prompt, max_tokens)
        self.all.append(req)
        self.sched.add(req)

    def abort(self, k: int) -> None:
        live = self.live
        if live:
            req = live[k % len(live)]
            self.sched.finish(req, RequestStatus.FINISHED_ABORTED)
            self.aborted.add(req.request_id)
            assert req.block_ids == [] and req.status is RequestStatus.FINISHED_ABORTED
            assert req not in self.sched.running and req not in self.sched.waiting

    def step(self):
        bm, sched = self.bm, self.sched
        bs = bm.block_size
        had_work = sched.has_unfinished()
        was_waiting = {id(r) for r in sched.waiting}
        out = sched.schedule()

        # --- the step's shape
        assert out.num_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        ids = [id(r) for r, _ in out.scheduled]
        assert len(ids) == len(set(ids)), f"a request scheduled twice: {out}"
        if had_work:  # the pool fits any single request, so some request always progresses
            assert out.scheduled, "nothing scheduled although requests are unfinished"
        running_ids = {id(r) for r in sched.running}
        for req, n in out.scheduled:
            assert n >= 1
            assert id(req) in running_ids and req.status is RequestStatus.RUNNING
            assert req.num_computed_tokens + n <= req.num_tokens
            assert len(req.block_ids) * bs >= req.num_computed_tokens + n, f"too few blocks: {req} +{n}"
            if id(req) in was_waiting and req.num_preemptions == 0:
                assert req.num_cached_tokens == req.num_computed_tokens  # what the cache served at admission
            if id(req) in was_waiting and req.num_computed_tokens > 0:
                assert bm.enable_prefix_caching and req.num_computed_tokens % bs == 0
                self.num_prefix_hits += 1
                _event("prefix-cache hit")
        for req in out.preempted:
            self.num_preemptions += 1
            _event("preemption")
            assert req.block_ids == [] and req.num_computed_tokens == 0
            assert req.status is RequestStatus.PREEMPTED and req in sched.waiting
            assert id(req) not in ids
        assert len({id(r) for r in out.preempted}) == len(out.preempted)

        # --- the KV cache model: what each scheduled request reads, then what it writes
        for req, n in out.scheduled:
            keys = _prefix_keys(req.all_token_ids)
            for p in range(req.num_computed_tokens):  # the context it attends to
                assert self.kv[req.block_ids[p // bs]][p % bs] == keys[p], \
                    f"{req} reads a wrong KV entry at position {p}"
            for p in range(req.num_computed_tokens, req.num_computed_tokens + n):
                b = req.block_ids[p // bs]
                assert bm.ref_counts[b] == 1, f"{req} writes position {p} into block {b}, shared by others"
                assert bm.block_hash[b] is None, f"{req} overwrites block {b}, registered in the prefix cache"
                self.kv[b][p % bs] = keys[p]

        # --- the engine's update
        for req, n in out.scheduled:
            req.num_computed_tokens += n
            bm.cache_full_blocks(req)
        for req, n in out.scheduled:
            if req.num_computed_tokens == req.num_tokens:
                req.output_token_ids.append(self.rng.randrange(VOCAB))
                if len(req.output_token_ids) >= req.max_tokens:
                    sched.finish(req, RequestStatus.FINISHED_LENGTH)
                    assert req.block_ids == []

        self.check()
        return out

    def check(self) -> None:
        bm, sched = self.bm, self.sched
        live = self.live
        bm.check_invariants(live)
        assert len(sched.running) <= sched.max_num_seqs
        assert len({id(r) for r in live}) == len(live), "a request is queued twice"
        for req in sched.waiting:
            assert req.block_ids == [] and req.num_computed_tokens == 0
            assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        for req in live:
            assert not req.is_finished
            assert 0 <= req.num_computed_tokens < req.num_tokens
            assert len(req.output_token_ids) < req.max_tokens
            assert len(req.block_hashes) <= len(req.block_ids)
        for req in self.all:
            if req.is_finished:
                assert req.block_ids == [] and req.block_hashes == []
        # blocks held by several requests: only full, hashed prefix blocks, at the same position
        holders: dict[int, list[tuple[Request, int]]] = {}
        for req in live:
            for i, b in enumerate(req.block_ids):
                holders.setdefault(b, []).append((req, i))
        for b, hs in holders.items():
            if len(hs) > 1:
                assert bm.enable_prefix_caching, f"block {b} shared without prefix caching"
                assert bm.block_hash[b] is not None, f"block {b} shared but holds no cached prefix"
                assert len({i for _, i in hs}) == 1, f"block {b} shared at different positions"
                for req, i in hs:
                    assert i < len(req.block_hashes) and req.block_hashes[i] == bm.block_hash[b]

    def drain(self, max_steps: int) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                break
            self.step()
        assert not self.sched.has_unfinished(), f"did not terminate in {max_steps} steps: {self.sched.running}"
        for req in self.all:
            if req.request_id in self.aborted:
                assert req.status is RequestStatus.FINISHED_ABORTED
            else:
                assert req.status is RequestStatus.FINISHED_LENGTH
                assert len(req.output_token_ids) == req.max_tokens
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(c == 0 for c in self.bm.ref_counts)
        assert self.sched.num_preemptions == self.num_preemptions == sum(r.num_preemptions for r in self.all)
        self.bm.check_invariants([])


@st.composite
def scenarios(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    max_out = draw(st.integers(1, 16))
    tokens = st.integers(0, VOCAB - 1)
    prefixes = [draw(st.lists(tokens, min_size=n, max_size=n))
                for n in draw(st.lists(st.integers(1, 48), min_size=1, max_size=3))]
    ops = []
    for _ in range(draw(st.integers(3, 10))):
        prefix = prefixes[draw(st.integers(0, len(prefixes) - 1))]
        n = draw(st.integers(1, MAX_PROMPT))
        shared = draw(st.integers(0, min(n, len(prefix))))
        prompt = prefix[:shared] + draw(st.lists(tokens, min_size=n - shared, max_size=n - shared))
        ops.append(("add", prompt, draw(st.integers(1, max_out))))
        ops += [("step",)] * draw(st.integers(0, 3))
        if draw(st.integers(0, 4)) == 0:
            ops.append(("abort", draw(st.integers(0, 100))))
    longest = max(len(o[1]) + o[2] for o in ops if o[0] == "add")
    # enough for any single request (its last sampled token is never computed), little more
    num_blocks = _blocks_needed(longest, block_size) + draw(st.integers(0, 3))
    return dict(
        block_size=block_size, num_blocks=num_blocks,
        max_num_seqs=draw(st.sampled_from([2, 3, 4, 8, 1])), max_num_batched_tokens=draw(st.integers(4, 64)),
        prefix_caching=draw(st.sampled_from([True, True, True, False])), seed=draw(st.integers(0, 2**16)), ops=ops)


def _run_scenario(sc) -> Sim:
    sim = Sim(sc["num_blocks"], sc["block_size"], sc["max_num_seqs"], sc["max_num_batched_tokens"],
              sc["prefix_caching"], sc["seed"])
    sim.check()
    for op in sc["ops"]:
        if op[0] == "add":
            sim.add(op[1], op[2])
        elif op[0] == "step":
            sim.step()
        else:
            sim.abort(op[1])
        sim.check()
    # every step computes >= 1 token, so this bound is far above what termination needs
    sim.drain(max_steps=20_000)
    return sim


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_scheduler_block_manager_invariants(sc):
    """Operations drawn by hypothesis (they shrink well on failure)."""
    _run_scenario(sc)


def _random_ops(rng: random.Random, block_size: int, max_out: int) -> list[tuple]:
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 48))] for _ in range(rng.randint(1, 3))]
    ops = []
    for _ in range(rng.randint(4, 12)):
        prefix = rng.choice(prefixes)
        n = rng.randint(1, MAX_PROMPT)
        shared = rng.randint(0, min(n, len(prefix)))
        prompt = prefix[:shared] + [rng.randrange(VOCAB) for _ in range(n - shared)]
        ops.append(("add", prompt, rng.randint(1, max_out)))
        ops += [("step",)] * rng.randint(0, 3)
        if rng.random() < 0.15:
            ops.append(("abort", rng.randrange(100)))
    return ops


@settings(max_examples=60, deadline=None)
@given(block_size=st.sampled_from([1, 2, 4, 16]), max_out=st.integers(4, 16), extra_blocks=st.integers(0, 3),
       max_num_seqs=st.integers(2, 8), max_num_batched_tokens=st.integers(4, 48), prefix_caching=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_scheduler_block_manager_invariants_heavy_load(block_size, max_out, extra_blocks, max_num_seqs,
                                                       max_num_batched_tokens, prefix_caching, seed):
    """Denser workloads (many overlapping requests, long outputs) from a seeded generator, so that
    preemption and prefix-cache hits are frequent; hypothesis picks the configuration and the seed."""
    ops = _random_ops(random.Random(seed), block_size, max_out)
    longest = max(len(o[1]) + o[2] for o in ops if o[0] == "add")
    sim = _run_scenario(dict(
        block_size=block_size, num_blocks=_blocks_needed(longest, block_size) + extra_blocks,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        prefix_caching=prefix_caching, seed=seed, ops=ops))
    if not prefix_caching:
        assert sim.num_prefix_hits == 0
    target(float(sim.num_preemptions), label="preemptions")  # steer the search toward tight pools


# ------------------------------------------------------------------ examples


def _run_until(sim: Sim, cond, max_steps=1000):
    for _ in range(max_steps):
        if cond():
            return
        sim.step()
    raise AssertionError("condition never reached")


def test_prefix_cache_hit_shares_blocks_with_running_request():
    sim = Sim(num_blocks=40, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, prefix_caching=True, seed=0)
    prompt = [(7 * i) % 5 for i in range(40)]
    sim.add(prompt, max_tokens=5)
    a = sim.all[0]
    sim.step()  # A's whole prefill
    assert a.num_computed_tokens == 40 and len(a.block_hashes) == 10
    sim.add(prompt, max_tokens=5)
    b = sim.all[1]
    out = sim.step()  # also checks that b reads, through its block table, a's KV of the same prefix
    # 9 full blocks hit (the last token is always computed, for its logits): 36 tokens cached
    assert out.scheduled == [(a, 1), (b, 4)]
    assert b.num_cached_tokens == 36 and a.num_cached_tokens == 0
    assert b.block_ids[:9] == a.block_ids[:9] and b.block_ids[9] != a.block_ids[9]
    assert all(sim.bm.ref_counts[x] == 2 for x in a.block_ids[:9])
    sim.drain(max_steps=100)


def test_prefix_cache_hit_after_owner_finished_reclaims_free_blocks():
    sim = Sim(num_blocks=12, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, prefix_caching=True, seed=0)
    prompt = list(range(40))
    sim.add(prompt, max_tokens=2)
    a = sim.all[0]
    _run_until(sim, lambda: a.is_finished)
    assert sim.bm.num_free_blocks == 12
    sim.add(prompt, max_tokens=2)
    b = sim.all[1]
    out = sim.step()
    assert out.scheduled == [(b, 4)] and b.num_cached_tokens == 36
    # its 9 cached blocks came out of the free queue, plus one new block
    assert sim.bm.num_free_blocks == 12 - 10
    for i, x in enumerate(b.block_ids[:9]):
        assert sim.bm.block_hash[x] == b.block_hashes[i]
    sim.drain(max_steps=100)


def test_no_prefix_hit_when_caching_disabled_or_prompt_differs():
    for caching, second in [(False, list(range(40))), (True, [99] + list(range(1, 40)))]:
        sim = Sim(num_blocks=30, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, prefix_caching=caching, seed=0)
        sim.add(list(range(40)), max_tokens=3)
        sim.step()
        sim.add(second, max_tokens=3)
        out = sim.sched.schedule()
        assert out.scheduled[1][0] is sim.all[1] and out.scheduled[1][1] == 40
        assert sim.all[1].num_computed_tokens == 0
        assert not set(sim.all[0].block_ids) & set(sim.all[1].block_ids)


def test_preemption_when_pool_is_tight_and_victim_completes():
    # two 16-token prompts generating 8 tokens each need 2 x 6 blocks of 4; the pool has 9
    sim = Sim(num_blocks=9, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, prefix_caching=True, seed=0)
    sim.add([1] * 8 + [2] * 8, max_tokens=8)
    sim.add([2] * 8 + [1] * 8, max_tokens=8)
    a, b = sim.all
    preempted = []
    for _ in range(200):
        if not sim.sched.has_unfinished():
            break
        preempted += sim.step().preempted
    assert not sim.sched.has_unfinished()
    # the most recently admitted request is the victim; it recomputes and still completes
    assert preempted and all(r is b for r in preempted)
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    for r in (a, b):
        assert r.status is RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 8
    assert sim.bm.num_free_blocks == 9


def test_no_admission_in_a_step_that_preempts():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=4, max_num_batched_tokens=5, prefix_caching=False, seed=0)
    sim.add([1] * 8, max_tokens=4)
    sim.add([2] * 7, max_tokens=4)
    a, b = sim.all
    sim.step()  # a: 5 tokens (2 blocks)
    sim.step()  # a: 3 more, samples; b: 2 tokens (1 block)
    assert (a.num_computed_tokens, a.num_tokens, b.num_computed_tokens) == (8, 9, 2)
    assert sim.bm.num_free_blocks == 1
    sim.add([3], max_tokens=1)
    c = sim.all[2]
    out = sim.sched.schedule()
    # a's decode takes the last block; b's next chunk (4 tokens) needs another: b, the latest
    # admitted, is preempted, and nobody is admitted although b's block is free again
    assert out.scheduled == [(a, 1)] and out.preempted == [b]
    assert list(sim.sched.waiting) == [b, c] and c.status is RequestStatus.WAITING
    assert sim.bm.num_free_blocks == 1
    sim.bm.check_invariants(sim.live)


def test_lru_eviction_reuses_oldest_freed_block_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = _make_request("a", [1, 2, 3, 4, 5], 4)
    b = _make_request("b", [6, 7, 8, 9, 10], 4)
    for r in (a, b):
        assert bm.allocate(r, 5)
        r.num_computed_tokens = 5
        bm.cache_full_blocks(r)
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3, 4, 5]
    assert len(a.block_hashes) == 2  # the third block holds one token: not cached
    bm.free(a)  # a's tail goes first, its prefix block last
    bm.free(b)
    assert list(bm.free_queue) == [2, 1, 0, 5, 4, 3]
    c = _make_request("c", [0, 0, 0], 1)
    assert bm.allocate(c, 3)
    assert c.block_ids == [2, 1]  # the oldest freed: a's partial block, then a's second block
    bm.check_invariants([c])
    # block 1 (a's second full block) was evicted from the prefix cache, block 0 was not
    assert bm.find_cached_prefix(_make_request("a2", [1, 2, 3, 4, 5], 4)) == [0]
    # b's blocks were freed later and still serve b's prefix
    assert bm.find_cached_prefix(_make_request("b2", [6, 7, 8, 9, 10], 4)) == [3, 4]
    # a freed block that is hit again leaves the free queue; the next eviction takes the next oldest
    d = _make_request("d", [6, 7, 8, 9, 10], 4)
    assert bm.allocate(d, 1, [3, 4])
    assert d.block_ids == [3, 4, 0] and bm.ref_counts[3] == bm.ref_counts[4] == 1
    assert list(bm.free_queue) == [5]
    bm.check_invariants([c, d])


def test_allocate_failure_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = _make_request("a", list(range(8)), 4)
    assert bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    before = (list(bm.ref_counts), list(bm.free_queue), dict(bm.cached), list(bm.block_hash))
    b = _make_request("b", list(range(12)), 4)
    assert not bm.allocate(b, 9)  # needs 3 blocks, 1 free
    assert b.block_ids == [] and (list(bm.ref_counts), list(bm.free_queue), dict(bm.cached), list(bm.block_hash)) == before
    # with a's 2 blocks as a cached prefix it needs only one more
    cached = bm.find_cached_prefix(b)
    assert cached == a.block_ids
    assert bm.allocate(b, 4, cached) and b.block_ids[:2] == a.block_ids
    bm.check_invariants([a, b])


def test_find_cached_prefix_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _make_request("a", list(range(12)), 4)
    assert bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)
    assert len(a.block_hashes) == 3
    # the same 12 tokens: only 2 blocks, so that token 11 is computed for its logits
    assert bm.find_cached_prefix(_make_request("b", list(range(12)), 4)) == a.block_ids[:2]
    assert bm.find_cached_prefix(_make_request("c", list(range(13)), 4)) == a.block_ids
    assert bm.find_cached_prefix(_make_request("d", list(range(4)), 4)) == []


def test_chunked_prefill_respects_budget():
    sim = Sim(num_blocks=20, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, prefix_caching=True, seed=0)
    sim.add(list(range(50)), max_tokens=2)
    a = sim.all[0]
    chunks = []
    while a.num_computed_tokens < 50 and not a.is_finished:
        out = sim.sched.schedule()
        chunks.append(out.scheduled[0][1])
        a.num_computed_tokens += out.scheduled[0][1]
        sim.bm.cache_full_blocks(a)
    assert chunks == [16, 16, 16, 2]


@settings(max_examples=200, deadline=None)
@given(prompt=st.lists(st.integers(0, 99), min_size=1, max_size=12), output=st.lists(st.integers(0, 99), max_size=12),
       start=st.integers(0, 25), length=st.integers(0, 25))
def test_token_ids_is_a_slice_of_all_token_ids(prompt, output, start, length):
    req = Request("r", prompt, SamplingParams(), max_tokens=16)
    req.output_token_ids = list(output)
    assert req.token_ids(start, start + length) == req.all_token_ids[start:start + length]
