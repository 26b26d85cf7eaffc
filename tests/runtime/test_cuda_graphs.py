"""The decode graphs' inputs: staged on the host, copied in one go, and unpacked by each graph's
first op into the buffers the forward reads (the capture and replay need CUDA; the staging and
the unpacking's torch form are checked here, on CPU; the kernel's in tests/codegen)."""

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.runtime import cuda_graphs
from kiln.runtime.cuda_graphs import DecodeGraphs, EmulatedGraph, bucket_sizes


def _graphs(max_num_seqs=6, max_blocks=5, scratch_block=9, block_size=4):
    return DecodeGraphs(forward=None, kv_caches=[], block_size=block_size, max_blocks_per_seq=max_blocks,
                        scratch_block=scratch_block, max_num_seqs=max_num_seqs, device=torch.device("cpu"))


def test_bucket_sizes():
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(8) == [1, 2, 4, 8]


@torch.inference_mode()  # (as run(), which stages: the buffers are inference tensors)
def test_stage_fills_rows_and_pads_to_the_bucket_with_the_scratch_block():
    g = _graphs()
    g.stage([11, 12, 13], [7, 3, 9], [29, 14, 37], [[7, 1], [3], [8, 2, 9]], [8, 4, 10], [5, 6, 7], padded=4)
    g.unpack(4)
    assert g.input_ids[:4].tolist() == [11, 12, 13, 0] and g.positions[:4].tolist() == [7, 3, 9, 0]
    assert g.seq_lens[:4].tolist() == [8, 4, 10, 1] and g.seq_lens.dtype == torch.int32
    assert g.staged_ids[:4].tolist() == [11, 12, 13, 0]
    assert g.staged_positions[:4].tolist() == [7, 3, 9, 0]
    assert g.slot_mapping[:4].tolist() == [29, 14, 37, g.scratch_slot]
    assert g.seq_lens_long[:4].tolist() == [8, 4, 10, 1]
    assert g.cross_slots[:4].tolist() == [5, 6, 7, 0]
    assert g.block_tables[0, :2].tolist() == [7, 1] and g.block_tables[1, :1].tolist() == [3]
    assert g.block_tables[2, :3].tolist() == [8, 2, 9] and g.block_tables[3, 0].item() == 9


@torch.inference_mode()  # (as run(), which stages: the buffers are inference tensors)
def test_a_smaller_step_after_a_larger_one_reads_only_its_own_rows():
    """Stale values stay only where nothing reads them: past `padded`, and past a row's blocks."""
    g = _graphs()
    g.stage([1, 2, 3, 4, 5], [4, 4, 4, 4, 4], [16, 17, 18, 19, 20], [[4, 5]] * 5, [5] * 5, None, padded=6)
    g.unpack(6)
    g.stage([8], [2], [10], [[2]], [3], None, padded=1)
    g.unpack(1)
    assert g.input_ids[0].item() == 8 and g.slot_mapping[0].item() == 10 and g.seq_lens[0].item() == 3
    assert g.block_tables[0, 0].item() == 2 and g.cross_slots[0].item() == 0
    # the alternate host buffer was written the step before: both steps landed whole
    g.stage([6, 7], [1, 1], [4, 8], [[1], [2]], [2, 2], None, padded=2)
    g.unpack(2)
    assert g.input_ids[:2].tolist() == [6, 7] and g.block_tables[:2, 0].tolist() == [1, 2]


class _Unpacking:
    """Stands in for a captured graph on CPU: its first op only (the unpacking), counted."""

    def __init__(self, graphs, b):
        self.graphs, self.b, self.replays = graphs, b, 0

    def replay(self):
        self.replays += 1
        self.graphs.unpack(self.b)


def test_async_tokens_are_filled_into_the_staged_ids_that_the_graph_unpacks():
    """Async scheduling's tokens from elsewhere (a sampled step's) are filled into the staged ids
    on the device before the replay; the graph's first op takes its input from them."""
    g = _graphs()
    g.graphs, g.outputs = {4: _Unpacking(g, 4)}, {4: torch.zeros(4, 8)}
    g.run([11, -1, 13], [7, 3, 9], [29, 14, 37], [[7], [3], [8]], [8, 4, 10],
          fill=(torch.tensor([40, 41]), [1], [1]))
    assert g.input_ids[:4].tolist() == [11, 41, 13, 0]


@pytest.mark.parametrize("buffers", [1, 2])
@torch.inference_mode()
def test_the_last_replays_argmax_is_read_inside_the_graph_by_index(monkeypatch, buffers):
    """Tokens that are the last replay's argmax in place (`last_tokens`) are not copied before the
    replay: the staged `src` names, per row, which of them the graph's first op takes (-1: the
    staged id), whatever bucket the last replay was. `src` indexes the token buffers flattened:
    with two, the last replay's is the other one from the one this replay's argmax writes."""
    monkeypatch.setattr(cuda_graphs, "TOKEN_BUFFERS", buffers)
    g = _graphs()
    g.graphs, g.outputs = {b: _Unpacking(g, b) for b in (1, 2, 4)}, {b: torch.zeros(b, 8) for b in (1, 2, 4)}
    g.last_tokens[:2] = torch.tensor([50, 51])  # (as a 2-row replay's argmax left them)
    assert g.takes_own(g.last_tokens[:2]) and not g.takes_own(g.last_tokens[:2].clone())
    start = (buffers - 1) * g.rows  # (before any replay, the "last" is buffer -1 % buffers)
    staged = g.staged_ids.clone()
    g.run([11, -1, -1], [7, 3, 9], [29, 14, 37], [[7], [3], [8]], [8, 4, 10], fill=(g.last_tokens[:2], [1, 2], [1, 0]))
    assert torch.equal(g.staged_ids[3:], staged[3:]) and g.staged_src[:4].tolist() == [-1, start + 1, start, -1]
    assert g.input_ids[:4].tolist() == [11, 51, 50, 0] and g.staged_token_buffer.item() == 0
    g.run([12, 13], [8, 4], [30, 15], [[7], [3]], [9, 5])  # no fill: every row its staged id
    assert g.staged_src[:2].tolist() == [-1, -1] and g.input_ids[:2].tolist() == [12, 13]
    assert g.staged_token_buffer.item() == 1 % buffers  # (the buffer the second replay's argmax writes)
    g.last_tokens[:2] = torch.tensor([60, 61])  # (as the second replay's argmax left them)
    g.run([-1], [9], [31], [[7]], [10], fill=(g.last_tokens[:2], [0], [1]))
    assert g.staged_src[:1].tolist() == [1 % buffers * g.rows + 1] and g.input_ids[:1].tolist() == [61]


class _Replay:
    """Stands in for a captured graph on CPU: counts its replays."""

    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@torch.inference_mode()
def test_run_hands_over_the_logits_and_argmax_its_graph_computed():
    g = _graphs()
    g.graphs[2], g.outputs[2] = _Replay(), torch.randn(3, 4)
    g.captured_logits[2] = torch.randn(3, 5)
    g.token_buffers[0, :3] = torch.tensor([4, 0, 1])  # (as the replay's argmax writes them)
    hidden = g.run([1, 2], [0, 0], [4, 5], [[1], [1]], [1, 1])
    assert g.graphs[2].replays == 1 and hidden.shape == (2, 4)
    logits = g.logits_of(hidden)
    assert torch.equal(logits, g.captured_logits[2][:2])
    assert g.greedy_of(logits).tolist() == [4, 0]
    # other tensors, even equal ones, are not this replay's
    assert g.logits_of(hidden.clone()) is None and g.greedy_of(logits.clone()) is None
    # a bucket captured without logits hands over none
    g.graphs[1], g.outputs[1] = _Replay(), torch.randn(2, 4)
    assert g.logits_of(g.run([3], [1], [6], [[1]], [2])) is None


class _ShiftedGraph(EmulatedGraph):
    """An emulated decode graph (`cuda_graphs.EmulatedGraph`: the capture's work replayed eagerly)
    whose argmax is the logits' plus `shift` (mod V), to show whose argmax the engine samples."""

    def __init__(self, graphs, b, shift=0):
        super().__init__(graphs, b)
        self.shift = shift

    def replay(self):
        super().replay()
        g = self.graphs
        greedy = g.token_buffers[g.staged_token_buffer.item(), :self.b]  # (what the replay's argmax wrote)
        greedy.copy_((greedy + self.shift) % g.captured_logits[self.b].shape[-1])


def _eager_graphs(llm, shift=0):
    """Emulated decode graphs on an eager engine's runner (see _ShiftedGraph)."""
    engine = llm.llm_engine
    runner, config = engine.runner, engine.config
    graphs = DecodeGraphs(runner.forward, runner.kv_caches, config.block_size,
                          -(-engine.max_model_len // config.block_size), runner.num_blocks, config.max_num_seqs,
                          torch.device("cpu"), logits=runner.logits, emulate=True)
    graphs.capture()
    graphs.graphs = {b: _ShiftedGraph(graphs, b, shift) for b in graphs.graphs}
    runner.decode_graphs = graphs
    return graphs


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_decode_steps_sample_the_logits_and_argmax_their_graph_computed(llama_path, async_scheduling):
    """The engine's decode steps through graphs that also compute the logits: the same tokens as
    without graphs, and a plain greedy request takes the graph's argmax (here shifted by one, so
    it shows), while one with a repetition penalty recomputes it from the logits."""
    prompts = ["Hello, my name is", "one two three four five six", "a"]
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(llama_path).generate(prompts, plain, use_tqdm=False)]
    llm = LLM(llama_path, async_scheduling=async_scheduling)
    graphs = _eager_graphs(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)] == want
    assert sum(g.replays for g in graphs.graphs.values()) >= 5  # (the decode steps went through them)

    shifted = _eager_graphs(llm, shift=1)
    got = llm.generate(prompts[0], plain, use_tqdm=False)[0].outputs[0].token_ids
    # the prompt's step runs no graph; the first decode step's token is the graph's argmax
    assert got[0] == want[0][0] and got[1] == (want[0][1] + 1) % llm.llm_engine.hf_config.vocab_size
    penalised = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3)
    want_penalised = LLM(llama_path).generate(prompts[0], penalised, use_tqdm=False)[0].outputs[0].token_ids
    replays = sum(g.replays for g in shifted.graphs.values())
    assert llm.generate(prompts[0], penalised, use_tqdm=False)[0].outputs[0].token_ids == want_penalised
    assert sum(g.replays for g in shifted.graphs.values()) > replays  # (through the graphs, their logits)


@pytest.mark.parametrize("buffers,async_scheduling", [(1, False), (1, True), (2, True)])
def test_emulated_graphs_through_the_engine(llama_path, monkeypatch, buffers, async_scheduling):
    """compilation_config={"cudagraph": "emulate"}: the compiled engine builds its decode graphs on
    a CPU, replayed eagerly, and gives the eager engine's tokens, with one token buffer or two
    (async scheduling reads each step's argmax from the buffer the last replay wrote); a bad value
    is a clear error."""
    monkeypatch.setattr(cuda_graphs, "TOKEN_BUFFERS", buffers)
    prompts = ["Hello, my name is", "one two three four five six", "a"]
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(llama_path).generate(prompts, plain, use_tqdm=False)]
    llm = LLM(llama_path, enforce_eager=False, max_num_seqs=4, async_scheduling=async_scheduling,
              compilation_config={"backend": "eager", "cudagraph": "emulate"})
    graphs = llm.llm_engine.runner.decode_graphs
    assert graphs is not None and graphs.emulate and graphs.sizes == [1, 2, 4]
    assert graphs.token_buffers.shape == (buffers, graphs.rows)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)] == want
    assert sum(g.replays for g in graphs.graphs.values()) >= 5 and graphs.replays >= 5
    with pytest.raises(ValueError, match=r"\['cudagraph'\] must be True, False or 'emulate', got 'yes'"):
        LLM(llama_path, enforce_eager=False, compilation_config={"backend": "eager", "cudagraph": "yes"})
